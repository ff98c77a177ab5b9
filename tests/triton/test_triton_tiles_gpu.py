"""Every autotune candidate of every Triton kernel, forced, against float64 on the GPU (``pytest -m gpu``).

The autotuner may pick any tile of a space depending on the GPU, the lengths and the clocks, and the interpreter
cannot tell a miscompiled tile from a right one (the causal head-dim-256 forward tile of issue 11 was right on the
CPU and wrong on the H200), so each tile runs here on sequence lengths that are tile multiples and ones that are
not (nor multiples of 16, which triton specialises on), causal and not, with the other kernels at their defaults.
Every 16-bit tile also runs at sequence length 1 and with one-sided and banded windows. A last group runs with
autotuning on.
"""

from __future__ import annotations

import pytest
import torch
from attnkit.backends.triton import configs
from triton_checks import Case, assert_ok, check_dense

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Head dims that land in each head-dim class of the tile tables (padded 16-64, 128, 256), exact powers of two
# first because they skip the column masks.
CLASS_DIMS = {64: (64, 40), 128: (128, 96), 256: (256, 200)}
LENGTHS = ((1024, 1024), (1000, 1000), (777, 1531))


def _tiles() -> list[tuple[str, int, int, configs.Tile]]:
    out = []
    for kind in configs.KINDS:
        for block_d in CLASS_DIMS:
            for elem_bytes in (2, 4):
                for tile in configs.candidates(kind, "nvidia", block_d, elem_bytes, tma=True):
                    out.append((kind, block_d, elem_bytes, tile))
    return out


def _name(entry) -> str:
    kind, block_d, elem_bytes, t = entry
    tma = "-tma" if t.use_tma else ""
    pers = f"-p{t.persistent}" if t.persistent else ""
    return f"{kind}-d{block_d}-{8 * elem_bytes}bit-{t.block_m}x{t.block_n}w{t.num_warps}s{t.num_stages}{tma}{pers}"


@pytest.mark.parametrize("entry", _tiles(), ids=_name)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_candidate_tile(entry, causal):
    from attnkit.backends.triton import launch

    kind, block_d, elem_bytes, tile = entry
    dtype = torch.float32 if elem_bytes == 4 else (torch.bfloat16 if kind != "dkdv" else torch.float16)
    # TMA tiles need 16-byte rows (head dim % 8 == 0) and a padded head dim <= 128; both dims of a class qualify.
    dims = CLASS_DIMS[block_d]
    seqlens = LENGTHS if elem_bytes == 2 else LENGTHS[1:2]  # float32 tiles: one odd length (slow products)
    failures = []
    for d in dims[:1] if elem_bytes == 4 else dims:
        for i, (sq, sk) in enumerate(seqlens):
            case = Case(b=2, sq=sq, sk=sk, hq=4, hk=2, d=d, dtype=dtype, causal=causal, device="cuda", seed=i + d)
            with launch.forced_tiles(**{kind: tile}):
                report = check_dense(case, grads=kind != "fwd")
            failures += [f"d={d} sq={sq} sk={sk}: {f}" for f in report.failures()]
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("entry", [e for e in _tiles() if e[2] == 2], ids=_name)
def test_every_candidate_tile_at_length_one(entry):
    """Sequence length 1 on either side: triton specialises a length of 1 to a constant and folds the loops over
    that side's blocks away, so the loop around them becomes the innermost one, a different kernel for the
    compiler (triton 3.6 aborted compiling the TMA backward at seqlen_q 1 and the persistent forward at
    seqlen_k 1)."""
    from attnkit.backends.triton import launch

    kind, block_d, _, tile = entry
    dtype = torch.bfloat16 if kind != "dkdv" else torch.float16
    failures = []
    for d in CLASS_DIMS[block_d]:
        for sq, sk in ((1, 129), (129, 1)):
            case = Case(b=2, sq=sq, sk=sk, hq=4, hk=2, d=d, dtype=dtype, causal=False, device="cuda", seed=sq + d)
            with launch.forced_tiles(**{kind: tile}):
                report = check_dense(case, grads=kind != "fwd")
            failures += [f"d={d} sq={sq} sk={sk}: {f}" for f in report.failures()]
    assert not failures, "; ".join(failures)


# One-sided and banded windows: each side is a compile-time branch of the kernels' block ranges, so each is a
# different kernel for the compiler (triton 3.6's ptxas crashed on the TMA backward of a left-only window).
WINDOWS = {"left": (92, -1), "right": (-1, 40), "band": (92, 40)}


@pytest.mark.parametrize("entry", [e for e in _tiles() if e[2] == 2], ids=_name)
@pytest.mark.parametrize("window", list(WINDOWS), ids=list(WINDOWS))
def test_every_candidate_tile_with_windows(entry, window):
    from attnkit.backends.triton import launch

    kind, block_d, _, tile = entry
    dtype = torch.bfloat16 if kind != "dkdv" else torch.float16
    failures = []
    for d in CLASS_DIMS[block_d]:
        case = Case(b=2, sq=1000, sk=777, hq=4, hk=2, d=d, dtype=dtype, window=WINDOWS[window], device="cuda",
                    seed=d)  # fmt: skip
        with launch.forced_tiles(**{kind: tile}):
            report = check_dense(case, grads=kind != "fwd")
        failures += [f"d={d}: {f}" for f in report.failures()]
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("d", [64, 128, 200, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_autotuned_tiles(d, causal, monkeypatch):
    """With autotuning on (whatever tile wins on this GPU), odd and even lengths."""
    monkeypatch.setenv("ATTNKIT_TRITON_AUTOTUNE", "1")
    for sq, sk in ((2048, 2048), (1000, 1000), (255, 2049)):
        assert_ok(check_dense(Case(b=2, sq=sq, sk=sk, hq=4, hk=2, d=d, dtype=torch.bfloat16, causal=causal,
                                   device="cuda", seed=sq + d)))  # fmt: skip
