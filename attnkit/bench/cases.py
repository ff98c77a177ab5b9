"""What a benchmark case is, the grids of cases, and the FLOP and byte counts that turn times into rates."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

MODES = ("fwd", "bwd", "fwdbwd", "decode", "memory", "overhead")
# Not a grid of cases: per-call host cost at tiny sizes (attnkit.bench.overhead), run beside the case modes.
OVERHEAD = "overhead"
DENSE_MODES = ("fwd", "bwd", "fwdbwd")

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}

# Backward costs 2.5x the forward (it recomputes the scores and does two more matmuls for dq, dk and dv).
# These are the factors flash-attn's benchmarks use, so numbers compare with its published plots.
BWD_FACTOR = 2.5
FWDBWD_FACTOR = 1.0 + BWD_FACTOR


@dataclass(frozen=True)
class Case:
    """One problem shape in one mode. Tensors are (batch, seqlen, heads, head_dim), flash-attn layout."""

    mode: str
    dtype: str
    batch: int
    heads_q: int
    heads_k: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def needs_grad(self) -> bool:
        # The memory mode measures a training step, the case where attention memory matters.
        return self.mode in ("bwd", "fwdbwd", "memory")

    @property
    def x(self) -> int:
        """The value on the x axis of this case's plot: the KV length for decode, else the sequence length."""
        return self.seqlen_k if self.mode == "decode" else self.seqlen_q

    @property
    def group(self) -> tuple[str, str, int, bool]:
        """Cases that share one table and one plot panel."""
        return (self.mode, self.dtype, self.head_dim, self.causal)

    def label(self) -> str:
        gqa = f"{self.heads_q}/{self.heads_k}" if self.heads_q != self.heads_k else str(self.heads_q)
        causal = " causal" if self.causal else ""
        shape = f"b={self.batch} h={gqa} s={self.seqlen_q}x{self.seqlen_k} d={self.head_dim}"
        return f"{self.mode} {self.dtype} {shape}{causal}"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def forward_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool) -> float:
    """4*B*H*Sq*Sk*D: two matmuls (QK^T and PV) of 2 FLOPs per multiply-add; causal skips half the scores."""
    flops = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    return flops / 2 if causal else flops


def case_flops(case: Case) -> float:
    fwd = forward_flops(case.batch, case.heads_q, case.seqlen_q, case.seqlen_k, case.head_dim, case.causal)
    if case.mode == "bwd":
        return BWD_FACTOR * fwd
    if case.mode in ("fwdbwd", "memory"):
        return FWDBWD_FACTOR * fwd
    return fwd


def kv_bytes(case: Case) -> int:
    """Bytes of K and V a decode step must read: the whole cache once (the figure of merit for decoding)."""
    return 2 * case.batch * case.seqlen_k * case.heads_k * case.head_dim * case.element_size


def input_bytes(case: Case) -> int:
    """Bytes of one set of inputs and outputs (q, k, v, out, and dout plus grads when training)."""
    q = case.batch * case.seqlen_q * case.heads_q * case.head_dim
    kv = case.batch * case.seqlen_k * case.heads_k * case.head_dim
    tensors = 2 * q + 2 * kv  # q, out, k, v
    if case.needs_grad:
        tensors += 2 * q + 2 * kv  # dout, dq, dk, dv
    return tensors * case.element_size


# The memory target of forward+backward: peak within this factor of the bytes of the tensors it cannot avoid.
MEMORY_TARGET = 1.10
LSE_BYTES = 4  # the float32 log-sum-exp per (batch, query head, query row) a fused forward keeps for backward


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes of the tensors one forward+backward cannot avoid, split by when they are allocated.

    ``before``: q, k, v and dout, made by the runner before the measurement starts, so *not* part of the
    measured "peak extra". ``during``: out, dq, dk, dv and the float32 lse, made by the step, so part of it.
    Comparing like with like: the step's peak is ``before + peak extra``, its budget ``before + during``.
    """

    before: int
    during: int

    @property
    def total(self) -> int:
        return self.before + self.during

    def ratio(self, peak_extra_bytes: float) -> float:
        """Peak memory of the step (inputs included) over the budget; the target is <= MEMORY_TARGET."""
        return (self.before + peak_extra_bytes) / self.total

    def max_peak_extra(self) -> float:
        """The largest "peak extra" that still meets the target, in bytes."""
        return MEMORY_TARGET * self.total - self.before


def memory_budget(case: Case) -> MemoryBudget:
    """The budget of one forward+backward of ``case`` (any mode that trains; see :class:`MemoryBudget`)."""
    if not case.needs_grad:
        raise ValueError(f"case.mode={case.mode!r} has no backward; the memory budget is for bwd, fwdbwd, memory")
    q = case.batch * case.seqlen_q * case.heads_q * case.head_dim * case.element_size
    kv = case.batch * case.seqlen_k * case.heads_k * case.head_dim * case.element_size
    lse = case.batch * case.heads_q * case.seqlen_q * LSE_BYTES
    return MemoryBudget(before=2 * q + 2 * kv, during=2 * q + 2 * kv + lse)  # (q, dout, k, v), (out, dq, dk, dv)


def scores_elements(case: Case) -> int:
    """Size of the full score matrix, the memory a non-fused implementation materialises."""
    return case.batch * case.heads_q * case.seqlen_q * case.seqlen_k


@dataclass(frozen=True)
class Grid:
    """The cartesian products the command line builds cases from (flash-attn's benchmark grid by default)."""

    modes: tuple[str, ...] = ("fwd", "bwd")
    dtype: str = "bf16"
    dims: tuple[int, ...] = (64, 128, 256)
    seqlens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    causal: tuple[bool, ...] = (False, True)
    tokens: int = 16384  # batch = tokens // seqlen keeps the work per case roughly constant
    hidden: int = 2048  # heads = hidden // head_dim
    heads: int | None = None  # fixed head count instead of hidden // head_dim
    decode_kv: tuple[int, ...] = tuple(1024 * 2**i for i in range(8))  # 1k .. 128k
    decode_batches: tuple[int | None, ...] = ()  # per decode_kv entry; None (or missing): decode_tokens // kv
    decode_heads: tuple[int, int] = (32, 8)  # GQA, as in Llama-3-8B
    decode_dim: int = 128
    decode_tokens: int = 131072  # batch = decode_tokens // kv_len: every decode case reads the same bytes
    # Up to 32k: the O(seqlen) memory target is stated at B=1, H=16, D=128, S=32k (see MemoryBudget).
    memory_seqlens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384, 32768)
    memory_batch: int = 1  # fixed batch, so the score matrix grows as S^2 and the curves show it
    memory_heads: int = 16
    memory_dim: int = 128


QUICK_GRID = Grid(
    dims=(32, 64),
    seqlens=(64, 128),
    tokens=128,
    heads=2,
    decode_kv=(64, 256),
    decode_heads=(4, 2),
    decode_dim=32,
    decode_tokens=256,
    memory_seqlens=(64, 128, 256),
    memory_heads=2,
    memory_dim=32,
)


def dense_cases(mode: str, dtype: str, dims: Iterable[int], seqlens: Iterable[int], causal: Iterable[bool],
                tokens: int, hidden: int, heads: int | None = None) -> list[Case]:  # fmt: skip
    cases = []
    for dim in dims:
        h = heads if heads is not None else max(1, hidden // dim)
        for is_causal in causal:
            for s in seqlens:
                cases.append(Case(mode, dtype, max(1, tokens // s), h, h, s, s, dim, is_causal))
    return cases


def decode_cases(dtype: str, kv_lens: Iterable[int], heads: tuple[int, int], dim: int, tokens: int,
                 batches: Sequence[int | None] = ()) -> list[Case]:  # fmt: skip
    """One case per KV length; batch ``batches[i]`` where given, else ``tokens // kv`` (every case reads the same
    bytes)."""
    hq, hk = heads
    cases = []
    for i, kv in enumerate(kv_lens):
        batch = batches[i] if i < len(batches) and batches[i] is not None else max(1, tokens // kv)
        cases.append(Case("decode", dtype, batch, hq, hk, 1, kv, dim, False))
    return cases


def memory_cases(dtype: str, seqlens: Iterable[int], batch: int, heads: int, dim: int) -> list[Case]:
    return [Case("memory", dtype, batch, heads, heads, s, s, dim, False) for s in seqlens]


def build_cases(grid: Grid) -> list[Case]:
    cases: list[Case] = []
    for mode in grid.modes:
        if mode in DENSE_MODES:
            cases += dense_cases(mode, grid.dtype, grid.dims, grid.seqlens, grid.causal, grid.tokens, grid.hidden,
                                 grid.heads)  # fmt: skip
        elif mode == "decode":
            cases += decode_cases(grid.dtype, grid.decode_kv, grid.decode_heads, grid.decode_dim, grid.decode_tokens,
                                  grid.decode_batches)  # fmt: skip
        elif mode == OVERHEAD:
            continue
        elif mode == "memory":
            cases += memory_cases(grid.dtype, grid.memory_seqlens, grid.memory_batch, grid.memory_heads,
                                  grid.memory_dim)  # fmt: skip
        else:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return cases


def parse_modes(values: Sequence[str]) -> tuple[str, ...]:
    """``--mode fwd --mode bwd`` and ``--mode fwd,bwd`` both work; order kept, duplicates dropped."""
    modes: list[str] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if part not in MODES:
                raise ValueError(f"unknown mode {part!r}; choose from {', '.join(MODES)}")
            if part not in modes:
                modes.append(part)
    return tuple(modes)


def parse_ints(value: str, what: str) -> tuple[int, ...]:
    """``"512,1k,16k"`` -> (512, 1024, 16384)."""
    out = []
    for part in value.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        try:
            n = int(part.removesuffix("k")) * scale
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not an integer (examples: 512, 4k)") from None
        if n <= 0:
            raise ValueError(f"{what}: {n} must be positive")
        out.append(n)
    if not out:
        raise ValueError(f"{what}: empty list")
    return tuple(out)


def parse_kv_lens(value: str, what: str = "--kv-lens") -> tuple[tuple[int, ...], tuple[int | None, ...]]:
    """``"4k,1x128k,16x8k"`` -> KV lengths (4096, 131072, 8192) and batches (None, 1, 16): ``BxL`` fixes the batch
    of one case, a bare length leaves it to ``decode_tokens // L``."""
    lens: list[int] = []
    batches: list[int | None] = []
    for part in value.split(","):
        part = part.strip().lower()
        if not part:
            continue
        batch, sep, length = part.partition("x")
        if not sep:
            batch, length = "", batch
        elif not batch:
            raise ValueError(f"{what}: {part!r} has no batch before 'x' (examples: 4k, 1x128k)")
        lens.append(parse_ints(length, what)[0])
        batches.append(parse_ints(batch, what)[0] if batch else None)
    if not lens:
        raise ValueError(f"{what}: empty list")
    return tuple(lens), tuple(batches)
