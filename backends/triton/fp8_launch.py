"""Host side of the fp8 forward kernel (:mod:`.fp8_fwd_kernel`): V's layout, tiles, TMA choice and the launch.

V layout. Hopper's fp8 wgmma reads its B operand K-major only, and for P @ V the reduction runs over the keys,
so the kernel wants V^T tiles. Two ways (``V_LAYOUT``; ``benchmarks/fp8_bench.py`` times both):

* ``"transposed"``: a one-time transposed copy of V per call, ``(B, Hk, Dv, Sk)`` with the key axis padded to 16
  bytes for TMA. It reads and writes V's bytes once, ``2 * B * Sk * Hk * Dv`` bytes (1 byte per fp8 value): ~14 us
  for 16k tokens x 16 KV heads x 128 channels at an H200's 4.8 TB/s, against ~0.7 ms of attention at 4k context
  (about 2% of the call; 8% at 1k, 0.5% at 16k), plus as many bytes of scratch.
* ``"as_stored"``: V untouched; triton copies each (keys x Dv) tile from shared memory through registers into a
  transposed shared buffer before the product (sm_90 compile: up to 13 more registers per thread, one more
  shared-memory round trip per tile).

``"auto"`` (the default) transposes where K and V^T stream through TMA (dense calls on Hopper) and keeps V as
stored elsewhere: for varlen calls, whose sequences' slices of a packed V^T would start at any byte, and for
pointer loads, where the transposed path spills registers on causal calls (sm_90 compile report).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton

from attnkit import env
from attnkit.errors import InvalidArgumentError
from attnkit.fp8 import Fp8Scales
from attnkit.params import AttentionParams, VarlenInfo

from . import configs, device, launch, probes, tma, tuning
from .fp8_fwd_kernel import attn_fwd_fp8

V_LAYOUTS = ("auto", "transposed", "as_stored")
V_LAYOUT = "auto"

# Tiles, (block_m, block_n, num_warps, num_stages, tma), default first (ATTNKIT_TRITON_AUTOTUNE=0); calls that
# cannot use TMA skip the TMA rows. Not timed yet (chosen on a machine without a GPU): every entry compiles for
# sm_90 with triton 3.9, causal or not, without register spills in the layout "auto" gives it (TMA rows: V^T;
# the others: V as stored). `benchmarks/fp8_bench.py xcompile` prints the report; 128 x 256 keys spilled 240
# bytes (causal) and was left out.
_T, _F = True, False
_CUDA_TILES: dict[str, list[tuple[int, int, int, int, bool]]] = {
    "small": [
        (128, 128, 8, 3, _T), (128, 64, 4, 3, _T), (64, 64, 4, 3, _T),
        (128, 128, 8, 3, _F), (128, 64, 4, 3, _F), (64, 64, 4, 3, _F),
    ],
    "mid": [
        (128, 128, 8, 3, _T), (128, 128, 8, 4, _T), (128, 64, 8, 3, _T), (64, 128, 4, 3, _T),
        (128, 128, 8, 2, _F), (128, 64, 8, 3, _F), (64, 64, 4, 3, _F),
    ],
    "large": [(128, 64, 8, 2, _F), (128, 32, 8, 2, _F), (64, 64, 4, 2, _F), (64, 32, 4, 2, _F)],
}  # fmt: skip
INTERPRETER_TILE = configs.Tile(32, 16, 4, 1)
# fp8 dots reduce over 32 elements per tensor-core step: head-dim tiles are at least that wide.
MIN_BLOCK_D = 32

_tuned: dict[tuple, configs.Tile] = {}
_forced: list[configs.Tile] = []


@contextlib.contextmanager
def forced_tile(tile: configs.Tile) -> Iterator[None]:
    """Run the fp8 forward with ``tile`` inside the block (tests and sweeps); a TMA tile needs a call that can
    use TMA. Tiles chosen outside the block stay remembered."""
    _forced.append(tile)
    try:
        yield
    finally:
        _forced.pop()


def _d_class(block_d: int) -> str:
    return "small" if block_d <= 64 else ("mid" if block_d <= 128 else "large")


def candidates(block_d: int, tma: bool) -> list[configs.Tile]:
    """The autotune space for a padded head dim, default first; TMA tiles only for calls that may use TMA."""
    rows = _CUDA_TILES[_d_class(block_d)]
    return [configs.Tile(m, n, w, s, use_tma=t) for m, n, w, s, t in rows if tma or not t]


def _block(dim: int) -> int:
    return configs.head_block(dim, MIN_BLOCK_D)


def _transposed_v(v: torch.Tensor, varlen: VarlenInfo | None) -> torch.Tensor:
    """V^T as a view shaped like ``v`` whose key axis has stride 1 (channel stride: the padded key count)."""
    keys = v.shape[0] if varlen is not None else v.shape[1]
    padded = -(-keys // 16) * 16  # TMA wants 16-byte rows
    if varlen is not None:
        buf = torch.empty(v.shape[1], v.shape[2], padded, dtype=v.dtype, device=v.device)
        buf[:, :, :keys].copy_(v.permute(1, 2, 0))
        return buf.permute(2, 0, 1)[:keys]
    buf = torch.empty(v.shape[0], v.shape[2], v.shape[3], padded, dtype=v.dtype, device=v.device)
    buf[..., :keys].copy_(v.permute(0, 2, 3, 1))
    return buf.permute(0, 3, 1, 2)[:, :keys]


def _tma_k_ok(prob: launch.Problem, k: torch.Tensor, idx64: bool) -> bool:
    """TMA for K: Hopper, 32-bit offsets, head dims of whole 16-byte rows, tiles at most 128 wide, 16-byte
    aligned base and row strides."""
    if idx64 or not k.is_cuda or not probes.use_tma(k.device):
        return False
    if max(_block(prob.head_dim), _block(prob.head_dim_v)) > 128 or prob.head_dim % 16 or prob.head_dim_v % 16:
        return False
    return k.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in k.stride()[:-1])


def _tma_v_ok(prob: launch.Problem, v_src: torch.Tensor, v_t: bool) -> bool:
    """TMA for V as stored, or for V^T of a dense call (a varlen sequence's slice of V^T starts at any byte)."""
    if v_src.data_ptr() % 16:
        return False
    if v_t:  # strides of key row (1), batch, head and channel (the padded key count)
        return prob.varlen is None and all(st % 16 == 0 for i, st in enumerate(v_src.stride()) if i != 1)
    return v_src.stride(-1) == 1 and all(st % 16 == 0 for st in v_src.stride()[:-1])


def _tma_ok(prob: launch.Problem, k: torch.Tensor, v_src: torch.Tensor, v_t: bool, idx64: bool) -> bool:
    return _tma_k_ok(prob, k, idx64) and _tma_v_ok(prob, v_src, v_t)


def _use_v_t(prob: launch.Problem, k: torch.Tensor, idx64: bool, hardware_tma: bool) -> bool:
    """V_LAYOUT "auto": V^T where the call streams K and V^T through TMA (dense, Hopper): every load pipelined and
    no spills in the sm_90 compile. Pointer loads keep V as stored, whose tiles copy 16 bytes at a time; the
    transposed pointer path spills on causal calls (benchmarks/fp8_bench.py xcompile)."""
    if V_LAYOUT not in V_LAYOUTS:
        raise InvalidArgumentError(f"fp8_launch.V_LAYOUT is {V_LAYOUT!r}; allowed: {', '.join(V_LAYOUTS)}")
    if V_LAYOUT != "auto":
        return V_LAYOUT == "transposed"
    return prob.varlen is None and hardware_tma and _tma_k_ok(prob, k, idx64)


def forward_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alibi: torch.Tensor | None,
    params: AttentionParams,
    varlen: VarlenInfo | None,
    scales: Fp8Scales,
    vendor: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense or varlen fp8 forward; ``out`` in ``scales.out_dtype``, ``lse`` float32 (layouts of params.py)."""
    prob = launch.problem_of(q, k, v, varlen)
    if varlen is None:
        out = launch.empty((prob.batch, prob.seqlen_q, prob.heads_q, prob.head_dim_v), scales.out_dtype, q.device)
        lse = launch.empty((prob.batch, prob.heads_q, prob.seqlen_q), torch.float32, q.device)
    else:
        # Rows past cu_seqlens_q[-1] belong to no sequence and are never written: define them (no key: 0, -inf).
        out = torch.zeros((q.shape[0], prob.heads_q, prob.head_dim_v), dtype=scales.out_dtype, device=q.device)
        lse = torch.full((prob.heads_q, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    interpreted = device.interpreted()
    hardware_tma = vendor == "nvidia" and not interpreted
    v_t = _use_v_t(prob, k, launch.needs_idx64(prob, [q, k, v, out]), hardware_tma)
    v_src = _transposed_v(v, varlen) if v_t else v
    idx64 = launch.needs_idx64(prob, [q, k, v_src, out])
    tma_allowed = hardware_tma and _tma_ok(prob, k, v_src, v_t, idx64)
    slopes, ssb = launch.slopes_of(alibi, q)
    cu_q, cu_k = launch.cu_seqlens(varlen, q)
    args = (
        q, k, v_src, out, lse, slopes, cu_q, cu_k, scales.q_descale, scales.k_descale, scales.v_descale,
        *launch.strides(q, varlen), *launch.strides(k, varlen), *launch.strides(v_src, varlen),
        *launch.strides(out, varlen), *launch.lse_strides(lse, varlen), ssb,
        prob.heads_q, prob.heads_q // prob.heads_k, prob.seqlen_q, prob.seqlen_k,
        float(params.softmax_scale), float(params.softcap), int(params.window_left), int(params.window_right),
        float(params.dropout_p), int(params.dropout_seed), prob.batch,
    )  # fmt: skip
    flags = {
        "HEAD_DIM": prob.head_dim,
        "HEAD_DIM_V": prob.head_dim_v,
        "BLOCK_D": _block(prob.head_dim),
        "BLOCK_DV": _block(prob.head_dim_v),
        "VARLEN": varlen is not None,
        "HAS_WL": params.window_left >= 0,
        "HAS_WR": params.window_right >= 0,
        "SOFTCAP": params.softcap > 0,
        "ALIBI": alibi is not None,
        "DROPOUT": params.dropout_p > 0,
        "V_T": v_t,
        "UPCAST": interpreted,
        "DOT_PREC": "ieee" if interpreted else "tf32",  # only the interpreter's float32 products read it
        "IDX64": idx64,
    }

    def launch_with(tile: configs.Tile) -> object:
        grid = (triton.cdiv(prob.seqlen_q, tile.block_m) * prob.batch * prob.heads_q,)
        return attn_fwd_fp8[grid](*args, **flags, **tile.launch_kwargs())

    with device.on_device(q), tma.scratch(tma_allowed):
        launch_with(_tile(prob, tma_allowed, flags, launch_with, interpreted))
    return out, lse


def _tile(prob: launch.Problem, tma: bool, flags: dict[str, object], launch_with, interpreted: bool) -> configs.Tile:
    """Fixed under the interpreter or with ATTNKIT_TRITON_AUTOTUNE=0, else the fastest candidate, timed once per
    key (tuning.autotune_tiles) and remembered."""
    if _forced:
        if _forced[-1].use_tma and not tma:
            raise InvalidArgumentError(f"forced fp8 tile {_forced[-1]} uses TMA, which this call cannot")
        return _forced[-1]
    if interpreted:
        return INTERPRETER_TILE
    block_d = max(_block(prob.head_dim), _block(prob.head_dim_v))
    tiles = candidates(block_d, tma)
    if not env.triton_autotune():
        return tiles[0]
    key = (tma, configs.seq_bucket(max(prob.seqlen_q, prob.seqlen_k)), *flags.values())
    tile = _tuned.get(key)
    if tile is None:
        tile = _tuned[key] = tuning.autotune_tiles(tiles, launch_with)
    return tile
