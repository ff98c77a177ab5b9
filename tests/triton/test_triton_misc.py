"""Layout, determinism and robustness of the Triton kernels (CPU interpreter)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
from attnkit.backends.triton import configs, device, fastpath, launch, tuning
from triton_checks import Case, assert_ok, backend, check_dense, check_varlen


def _run(q, k, v, dout, params, slopes=None):
    be = backend()
    out, lse = be.forward(q, k, v, slopes, params, None)
    return (out, lse, *be.backward(dout, q, k, v, out, lse, slopes, params, None))


def test_deterministic_backward_is_bitwise_reproducible():
    case = Case(sq=45, sk=61, hq=4, hk=1, dtype=torch.bfloat16, causal=True, dropout_p=0.2, alibi="h", seed=1)
    q, k, v, dout, slopes = case.tensors()
    first = _run(q, k, v, dout, case.params(), slopes)
    second = _run(q, k, v, dout, case.params(), slopes)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_strided_inputs_match_contiguous_bitwise():
    """Strides are kernel arguments: packed-QKV slices, head-major storage and a strided head dim give
    bit-identical results to contiguous copies (the loads change, the arithmetic does not)."""
    b, s, h, d = 2, 37, 2, 32
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, s, 3, h, d, generator=gen).to(torch.float16)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    v = torch.randn(b, h, s, 2 * d, generator=gen).to(torch.float16).transpose(1, 2)[..., ::2]  # head dim stride 2
    dout = torch.randn(b, h, s, d, generator=gen).to(torch.float16).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or dout.is_contiguous())
    params = Case(d=d, causal=True).params()
    strided = _run(q, k, v, dout, params)
    dense = _run(q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous(), params)
    for a, b_ in zip(strided, dense):
        assert torch.equal(a, b_)


def test_outputs_are_fully_written(monkeypatch):
    """Outputs are allocated NaN-filled: every element must be written (masked rows included)."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launch, "empty", poisoned)
    case = Case(b=2, sq=61, sk=29, hq=4, hk=2, d=40, dv=24, dtype=torch.float32, causal=True, seed=2)
    q, k, v, dout, _ = case.tensors()
    for t in _run(q, k, v, dout, case.params()):
        assert not bool(t.isnan().any())
    assert_ok(check_dense(case))


def test_int64_index_path_matches(monkeypatch):
    """The 64-bit in-sequence offset variant (used when rows * stride passes 2**31) computes the same result."""
    case = Case(sq=40, sk=70, hq=2, hk=1, dtype=torch.float16, window=(20, 3), seed=3)
    q, k, v, dout, _ = case.tensors()
    base = _run(q, k, v, dout, case.params())
    monkeypatch.setattr(launch, "needs_idx64", lambda prob, tensors: True)
    wide = _run(q, k, v, dout, case.params())
    for a, b in zip(base, wide):
        assert torch.equal(a, b)


def test_needs_idx64_threshold():
    q = torch.empty(0)
    prob = launch.Problem(1, 1, 1, 2**21, 2**21, 128, 128, None)
    big_row = torch.empty_strided((1, 2, 1, 128), (0, 2**11, 128, 1))
    assert launch.needs_idx64(prob, [big_row])  # 2**21 rows x 2**11 elements > 2**31
    small = launch.Problem(1, 1, 1, 1024, 1024, 128, 128, None)
    assert not launch.needs_idx64(small, [big_row, q.new_empty(1, 1024, 1, 128)])


def test_tma_descriptor_path_under_interpreter(monkeypatch):
    """The Hopper variant (K/V, Q/dO through tensor descriptors) runs in the interpreter too: same answers."""
    tiles = {
        kind: configs.Tile(t.block_m, t.block_n, t.num_warps, t.num_stages, use_tma=True)
        for kind, t in configs.INTERPRETER_TILES.items()
    }
    monkeypatch.setattr(configs, "INTERPRETER_TILES", tiles)
    assert_ok(check_dense(Case(sq=45, sk=61, hq=4, hk=2, d=40, dv=24, dtype=torch.bfloat16, causal=True, seed=4)))
    assert_ok(check_dense(Case(sq=33, sk=20, dtype=torch.float32, window=(5, 1), dropout_p=0.3, seed=5)))


def test_empty_problems():
    be = backend()
    params = Case(d=16).params()
    q = torch.randn(2, 0, 2, 16)
    k = torch.randn(2, 5, 2, 16)
    out, lse = be.forward(q, k, k, None, params, None)
    assert out.shape == (2, 0, 2, 16) and lse.shape == (2, 2, 0)
    q = torch.randn(2, 4, 2, 16)
    k0 = torch.randn(2, 0, 2, 16)
    out, lse = be.forward(q, k0, k0, None, params, None)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    dq, dk, dv = be.backward(torch.ones_like(out), q, k0, k0, out, lse, None, params, None)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k0.shape and dv.shape == k0.shape


def test_interpreter_switch_after_import_is_reported(monkeypatch):
    backend().forward(*Case().tensors()[:3], None, Case().params(), None)  # kernels imported interpreted
    monkeypatch.delenv("TRITON_INTERPRET")
    from attnkit.errors import AttnkitError

    with pytest.raises(AttnkitError, match="TRITON_INTERPRET"):
        device.interpreted()


@pytest.mark.parametrize("variant", ["persistent", "warp_specialize"])
def test_forward_loop_variants_match(monkeypatch, variant):
    """Scheduling variants of the forward run the same step per key block, so they give the plain tile's answers
    bitwise: the persistent grid (few programs, each walking tiles heaviest first) and the warp-specialised key
    loop (``tl.range(..., warp_specialize=True)``); masks, dropout and varlen (whose shorter sequences leave
    tiles with nothing to do) included."""
    from attnkit.backends.triton import probes

    if variant == "warp_specialize" and not probes.has_warp_specialize():
        pytest.skip(f"this triton ({triton.__version__}) has no tl.range(warp_specialize=...)")
    fwd = configs.INTERPRETER_TILES["fwd"]
    tile = dataclasses.replace(fwd, **({"persistent": 1} if variant == "persistent" else {"warp_specialize": True}))
    case = Case(b=2, sq=70, sk=53, hq=4, hk=2, d=24, dtype=torch.bfloat16, causal=True, alibi="h", seed=11)
    q, k, v, slopes = case.tensors()[:4]
    params = case.params()
    out_ref, lse_ref = backend().forward(q, k, v, slopes, params, None)
    monkeypatch.setitem(configs.INTERPRETER_TILES, "fwd", tile)
    out, lse = backend().forward(q, k, v, slopes, params, None)
    assert torch.equal(out, out_ref) and torch.equal(lse, lse_ref)
    assert_ok(check_dense(Case(sq=45, sk=61, hq=4, hk=2, d=40, window=(9, 3), dropout_p=0.2, seed=12)))
    assert_ok(check_varlen(Case(hq=4, hk=2, d=24, dtype=torch.bfloat16, causal=True, seed=13), [7, 70, 0], [12, 60, 4]))


def test_forward_fast_launch_reuses_the_compiled_kernel(monkeypatch):
    """The compiled-kernel plan (GPU only, so faked here): a repeated call with the same key launches the kernel
    of the first call through its bound launcher with exactly the arguments triton's JIT dispatch bound; anything
    in the key (parameters, alignment, shapes) going differently takes the full path again."""
    from fake_triton import fake_jit, no_driver

    jit_calls, fast_calls = [], []
    monkeypatch.setattr(launch, "attn_fwd", fake_jit(launch.attn_fwd, jit_calls, fast_calls))
    monkeypatch.setattr(device, "interpreted", lambda: False)
    monkeypatch.setattr(launch, "fwd_plans", fastpath.Plans())
    no_driver(monkeypatch)
    monkeypatch.setenv("ATTNKIT_TRITON_AUTOTUNE", "0")
    case = Case(b=2, sq=40, sk=24, hq=4, hk=2, d=32, dtype=torch.bfloat16, alibi="h", softcap=5.0)
    q, k, v, _, slopes = case.tensors()
    params = case.params()
    out1, _ = launch.forward(q, k, v, slopes, params, None, "nvidia")
    out2, lse2 = launch.forward(q, k, v, slopes, params, None, "nvidia")
    assert len(jit_calls) == 1 and len(fast_calls) == 1
    (grid, expected), (fast_grid, got) = jit_calls[0], fast_calls[0]
    assert fast_grid == grid and len(got) == len(expected)
    assert got[5] is out2 and got[6] is lse2 and out2 is not out1
    for i, (a, b) in enumerate(zip(got, expected)):
        if i not in (5, 6):
            assert a is b or (not isinstance(a, torch.Tensor) and a == b and type(a) is type(b)), i
    # Different parameters, a misaligned view, another shape: the full path (and a new plan) each time.
    launch.forward(q, k, v, slopes, Case(causal=True).params(), None, "nvidia")
    flat = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)
    launch.forward(flat, k, v, slopes, params, None, "nvidia")
    launch.forward(q[:, :20], k, v, slopes, params, None, "nvidia")
    assert len(jit_calls) == 4 and len(fast_calls) == 1
    # Dropout (a new seed per call) never uses it.
    drop = Case(dropout_p=0.1).params()
    launch.forward(q, k, v, slopes, drop, None, "nvidia")
    launch.forward(q, k, v, slopes, drop, None, "nvidia")
    assert len(jit_calls) == 6 and len(fast_calls) == 1
    # The switch: plans off, every call through the JIT.
    monkeypatch.setenv("ATTNKIT_HOST_FASTPATH", "0")
    launch.forward(q, k, v, slopes, params, None, "nvidia")
    assert len(jit_calls) == 7 and len(fast_calls) == 1


@pytest.mark.parametrize(
    "version,ok", [("3.2.0", False), ("3.3.0", True), ("3.6.0", True), ("3.10.1", True), ("3.3.0+git1a2b", True),
                   ("4.0", True), ("2.3.1", False), ("main", False)],
)  # fmt: skip
def test_fast_launch_version_gate(version, ok):
    """Triton <= 3.2 hands the launcher only non-constexpr arguments: the fast path must stay off there."""
    assert fastpath.triton_at_least(version, fastpath.MIN_TRITON) is ok


def test_forced_tiles_reach_every_kernel(monkeypatch):
    """launch.forced_tiles() decides the tile of each kernel it names (the GPU tile tests and the fuzzer force
    every autotune candidate through it), and the choice ends with the block."""
    seen: list[tuple[str, configs.Tile]] = []
    original = tuning.tile_for

    def spy(kind, *args, **kwargs):
        tile = original(kind, *args, **kwargs)
        seen.append((kind, tile))
        return tile

    monkeypatch.setattr(tuning, "tile_for", spy)
    forced = {"fwd": configs.Tile(16, 32, 4, 1), "dkdv": configs.Tile(32, 16, 4, 1), "dq": configs.Tile(16, 16, 4, 1)}
    case = Case(sq=45, sk=29, hq=4, hk=2, d=40, dtype=torch.float16, causal=True, seed=21)
    with launch.forced_tiles(**forced):
        assert_ok(check_dense(case))
    assert dict(seen) == forced
    seen.clear()
    assert_ok(check_dense(case))
    assert dict(seen) == configs.INTERPRETER_TILES
