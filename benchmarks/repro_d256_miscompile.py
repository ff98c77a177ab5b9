"""Reproducer of triton 3.6's miscompile of the head-dim-256 forward tile 64x64 w8 s2 (issue 11), and the
neighbourhood that is right: lengths, masks, tiles, head dims, integer specialisation, and the backward kernels
alone. One line per variant: relative error of out and lse against float32. Needs a CUDA GPU:

    python benchmarks/repro_d256_miscompile.py

Results on an H200: benchmarks/results/h200_2026-12-01_trust/repro_d256.txt; notes: NOTES-triton.md, "Head dim 256".
The tile is forced with launch.forced_tiles, so this still shows the bug after the tile left the autotune space.
"""

from __future__ import annotations

import sys

import torch
import triton
from attnkit.backends.triton import configs, fwd_kernel, launch

from attnkit.params import AttentionParams
from attnkit.testing import attention_naive


def ref(q, k, v, causal, window):
    out, lse = attention_naive(q.float(), k.float(), v.float(), causal=causal, window_size=window, return_lse=True)
    return out, lse


def rel(a, b):
    a, b = a.float(), b.float()
    fin = torch.isfinite(b)
    return float((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-30))


def run(b, sq, sk, h, d, dtype, causal, window, tile, kernel=None, label=""):
    gen = torch.Generator(device="cuda").manual_seed(sq * 7 + sk)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(b, sk, h, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(b, sk, h, d, device="cuda", dtype=dtype, generator=gen)
    wl, wr = window
    if causal:
        wr = 0
    params = AttentionParams(softmax_scale=d**-0.5, causal=causal, window_left=wl, window_right=wr)
    original = launch.attn_fwd
    if kernel is not None:
        launch.attn_fwd = kernel
    try:
        with launch.forced_tiles(fwd=tile):
            out, lse = launch.forward(q, k, v, None, params, None, "nvidia")
    finally:
        launch.attn_fwd = original
    ro, rl = ref(q, k, v, causal, window)
    eo, el = rel(out, ro), rel(lse, rl)
    # rows wrong per 64-row block of (batch 0, head 0)
    bad = ((out.float() - ro).abs().amax(dim=(2, 3)) > 0.05)[0]
    blocks = sorted({int(i) // 64 for i in bad.nonzero().flatten().tolist()})
    flag = "WRONG" if eo > 1e-2 else "ok"
    print(
        f"{label:<14} b{b} sq{sq} sk{sk} d{d} {str(dtype)[6:]} causal={causal} win={window} tile={tile.block_m}x"
        f"{tile.block_n} w{tile.num_warps} s{tile.num_stages} tma={tile.use_tma}: out {eo:.2e} lse {el:.2e} {flag}"
        f" bad64blocks(b0)={blocks[:12]}",
        flush=True,
    )
    return eo


def bwd_only(b, sq, sk, h, d, dtype, causal, kv_tile, q_tile):
    gen = torch.Generator(device="cuda").manual_seed(sq + 3)
    q, k, v, dout = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, generator=gen) for n in (sq, sk, sk, sq))
    exact_in = [t.double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = attention_naive(*exact_in, causal=causal, return_lse=True)
    want = torch.autograd.grad(out64, exact_in, dout.double())
    params = AttentionParams(softmax_scale=d**-0.5, causal=causal, window_right=0 if causal else -1)
    with launch.forced_tiles(dkdv=kv_tile, dq=q_tile):
        got = launch.backward(dout, q, k, v, out64.to(dtype), lse64.float().contiguous(), None, params, None, "nvidia")
    errs = [rel(g, w) for g, w in zip(got, want)]
    flag = "WRONG" if max(errs) > 2e-2 else "ok"
    print(
        f"bwd-only sq{sq} d{d} causal={causal} dkdv={kv_tile.block_m}x{kv_tile.block_n}w{kv_tile.num_warps}"
        f"s{kv_tile.num_stages} dq={q_tile.block_m}x{q_tile.block_n}w{q_tile.num_warps}s{q_tile.num_stages}: "
        f"dq {errs[0]:.2e} dk {errs[1]:.2e} dv {errs[2]:.2e} {flag}",
        flush=True,
    )


def main() -> int:
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
    T = configs.Tile
    default = T(64, 64, 8, 2)
    # 1. lengths: tile multiple, multiple of 16 only, neither
    for s in (1024, 1008, 1000, 1016, 960, 999, 255, 256, 257, 64, 65):
        run(2, s, s, 4, 256, torch.bfloat16, True, (-1, -1), default, label="len")
    run(1, 255, 2049, 4, 256, torch.bfloat16, True, (-1, -1), default, label="len")
    run(1, 2049, 255, 4, 256, torch.bfloat16, True, (-1, -1), default, label="len")
    # 2. masks at a failing length
    for causal, win in (
        (False, (-1, -1)),
        (False, (-1, 0)),
        (False, (10**6, 0)),
        (False, (100, 0)),
        (False, (-1, 5)),
        (False, (100, 100)),
    ):
        run(2, 1000, 1000, 4, 256, torch.bfloat16, causal, win, default, label="mask")
    # 3. tiles at a failing length
    for tile in (
        T(64, 64, 8, 1),
        T(64, 64, 4, 2),
        T(64, 64, 4, 1),
        T(64, 32, 4, 2),
        T(64, 32, 4, 1),
        T(32, 32, 4, 2),
        T(32, 64, 4, 2),
        T(128, 64, 8, 2),
        T(128, 32, 8, 2),
        T(64, 64, 8, 3),
        T(64, 32, 8, 2),
    ):
        try:
            run(2, 1000, 1000, 4, 256, torch.bfloat16, True, (-1, -1), tile, label="tile")
        except Exception as exc:
            print("tile", tile, "failed:", type(exc).__name__, str(exc)[:200])
    # 4. other head dims, same tile
    for d in (192, 200, 224, 240, 256):
        run(2, 1000, 1000, 4, d, torch.bfloat16, True, (-1, -1), default, label="dims")
        run(2, 1000, 1000, 4, d, torch.float16, True, (-1, -1), default, label="dims")
    # 5. specialisation: the same kernel without integer specialisation of the lengths
    nospec = triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "batch"])(fwd_kernel.attn_fwd.fn)
    for s in (1024, 1000):
        run(2, s, s, 4, 256, torch.bfloat16, True, (-1, -1), default, kernel=nospec, label="nospec")
    run(2, 1024, 1024, 4, 128, torch.bfloat16, True, (-1, -1), T(64, 64, 4, 3), kernel=nospec, label="nospec128")
    # 7. backward kernels alone (exact out/lse given), every large-class dK/dV and dQ tile
    for s, causal in ((1000, True), (1024, True), (1000, False)):
        for kv_tile, q_tile in ((T(16, 32, 4, 2), T(64, 32, 8, 2)), (T(32, 32, 4, 2), T(32, 32, 4, 2))):
            bwd_only(2, s, s, 4, 256, torch.bfloat16, causal, kv_tile, q_tile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
