"""Fuzz of the public API: random valid and invalid calls of attention, attention_varlen and piecewise_attention.

Each example draws a small valid call (shapes, GQA, Dv != D, odd lengths, masks, softcap, ALiBi, odd strides,
strided offsets, huge windows and thresholds, negative scales) and then, with some probability, one mutation that
makes exactly one argument invalid. A valid call must match float64 within flash-attn's rule (error <= 2x the plain
low-precision error + atol); an invalid one must raise an AttnkitError that is a ValueError/TypeError and whose
message names the argument, and must leave its inputs untouched. Any other exception fails the test.

The reference backend always runs; triton_cuda runs when the Triton interpreter is on (tests/triton/conftest.py
sets TRITON_INTERPRET while the session collects, so a run that includes tests/triton covers it) or a GPU is there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import AttnkitError
from attnkit.registry import REGISTRY
from attnkit.testing import (
    attention_ref,
    attention_varlen_ref,
    piecewise_attention_ref,
    within_tolerance,
)

# Twice the profile's examples: each draws one of many shapes and options, and small calls are fast.
EXAMPLES = 2 * settings.default.max_examples
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-5, torch.float64: 1e-9}
DTYPES = {"reference": [torch.float32, torch.float64, torch.bfloat16], "triton_cuda": [torch.float32, torch.float16]}


def _triton_runs() -> bool:
    return REGISTRY.get("triton_cuda").unavailable_reason() is None and (torch.cuda.is_available() or _interpreter_on())


def _interpreter_on() -> bool:
    from attnkit.backends.triton import probes

    return probes.interpreter_enabled()


BACKENDS = ["reference", "triton_cuda"]


def _skip_unless_runs(backend: str) -> None:
    # Decided at run time, not at collection: tests/triton/conftest.py turns the interpreter on while the
    # session collects, which may be after this module was imported.
    if backend == "triton_cuda" and not _triton_runs():
        pytest.skip("triton_cuda needs the Triton interpreter (a run that includes tests/triton) or a GPU")


@dataclasses.dataclass
class Call:
    """One call: positional tensors and keywords; ``expect`` names the invalid argument, None when valid."""

    fn: Callable
    args: list
    kwargs: dict
    expect: str | None = None


def _device(backend: str) -> str:
    compiled = backend == "triton_cuda" and torch.cuda.is_available() and not _interpreter_on()
    return "cuda" if compiled else "cpu"


def _tensor(draw, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Random values, sometimes as a view with odd strides (still contiguous in the last dimension)."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    layout = draw(st.sampled_from(["dense", "padded", "transposed"]))
    if layout == "padded" and len(shape) >= 3:
        # A slice of a longer buffer whose extra rows hold NaN: they must never be read.
        big = torch.full((*shape[:-3], shape[-3] + 3, *shape[-2:]), float("nan"), dtype=torch.float64)
        big[..., : shape[-3], :, :] = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return big.to(dtype).to(device)[..., : shape[-3], :, :]
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    if layout == "transposed" and len(shape) >= 3:
        # Heads outermost in memory, then rows: other strides than the dense layout.
        return x.transpose(-2, -3).contiguous().transpose(-2, -3)
    return x


def _options(draw, hq: int, batch: int, device: str) -> dict:
    kw: dict = {}
    scale = draw(st.sampled_from([None, None, 0.0, 0.3, -0.5, -5.0, -20.0, -20.0, 2.0, 8.0]))
    if scale is not None:
        kw["softmax_scale"] = scale
    if draw(st.booleans()):
        kw["return_lse"] = True
    # Unmasked calls without score modifiers take the kernels' fastest path: draw them often.
    if draw(st.integers(0, 4)) < 2:
        return kw
    if draw(st.booleans()):
        kw["causal"] = True
    window = draw(
        st.sampled_from(
            [None, (-1, -1), (0, 0), (3, 1), (1, -1), (-1, 2), (-1, 2**31 - 1), (2**63, 0), (10**30, 2**40)]
        )
    )
    if window is not None:
        kw["window_size"] = window
    softcap = draw(st.sampled_from([0.0, 0.0, 0.5, 5.0, 1e6]))
    if softcap:
        kw["softcap"] = softcap
    alibi = draw(st.sampled_from([None, None, "h", "bh"]))
    if alibi == "h":
        kw["alibi_slopes"] = torch.rand(hq, device=device)
    elif alibi == "bh":
        kw["alibi_slopes"] = torch.rand(batch, hq, device=device)
    return kw


@st.composite
def dense_calls(draw, backend: str) -> Call:
    device = _device(backend)
    dtype = draw(st.sampled_from(DTYPES[backend]))
    batch = draw(st.integers(1, 2))
    sq, sk = draw(st.sampled_from([1, 5, 17, 37])), draw(st.sampled_from([0, 1, 6, 23, 37, 37]))
    hk = draw(st.sampled_from([1, 2]))
    hq = hk * draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([8, 16, 24]))
    dv = draw(st.sampled_from([d, 8]))
    q = _tensor(draw, (batch, sq, hq, d), dtype, device)
    k = _tensor(draw, (batch, sk, hk, d), dtype, device)
    v = _tensor(draw, (batch, sk, hk, dv), dtype, device)
    kw = _options(draw, hq, batch, device)
    if draw(st.booleans()):
        kw["deterministic"] = True
    return Call(attnkit.attention, [q, k, v], kw)


def _offsets(lengths: list[int], strided: bool, device: str) -> torch.Tensor:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    if strided:
        spread = torch.full((2 * cu.numel() + 1,), -7, dtype=torch.int32)
        spread[1::2] = cu
        cu = spread[1::2]
    return cu.to(device)


@st.composite
def varlen_calls(draw, backend: str) -> Call:
    device = _device(backend)
    dtype = draw(st.sampled_from(DTYPES[backend]))
    batch = draw(st.integers(1, 3))
    lens_q = draw(st.lists(st.sampled_from([0, 1, 4, 13]), min_size=batch, max_size=batch))
    lens_k = draw(st.lists(st.sampled_from([0, 1, 7, 19]), min_size=batch, max_size=batch))
    pad_q, pad_k = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    hk = draw(st.sampled_from([1, 2]))
    hq = hk * draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([8, 16]))
    q = _tensor(draw, (sum(lens_q) + pad_q, hq, d), dtype, device)
    k = _tensor(draw, (sum(lens_k) + pad_k, hk, d), dtype, device)
    v = _tensor(draw, (sum(lens_k) + pad_k, hk, d), dtype, device)
    cq = _offsets(lens_q, draw(st.booleans()), device)
    ck = _offsets(lens_k, draw(st.booleans()), device)
    mq = max(lens_q) + draw(st.sampled_from([0, 0, 2, 10**6, 2**40]))
    mk = max(lens_k) + draw(st.sampled_from([0, 0, 1, 2**31]))
    kw = _options(draw, hq, batch, device)
    return Call(attnkit.attention_varlen, [q, k, v, cq, ck, mq, mk], kw)


@st.composite
def piecewise_calls(draw, backend: str) -> Call:
    device = _device(backend)
    dtype = draw(st.sampled_from(DTYPES[backend]))
    batch = draw(st.integers(1, 2))
    sq, sk = draw(st.sampled_from([1, 6, 19])), draw(st.sampled_from([1, 9, 23]))
    hk = draw(st.sampled_from([1, 2]))
    hq = hk * draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([8, 16]))
    q1, q2 = (_tensor(draw, (batch, sq, hq, d), dtype, device) for _ in range(2))
    k1, k2 = (_tensor(draw, (batch, sk, hk, d), dtype, device) for _ in range(2))
    v = _tensor(draw, (batch, sk, hk, d), dtype, device)
    threshold = draw(st.sampled_from([0, 1, 3, -2, 2**31, 2**63, -(2**63) - 1]))
    kw: dict = {}
    if draw(st.booleans()):
        kw["causal"] = True
    scale = draw(st.sampled_from([None, 0.25, -3.0]))
    if scale is not None:
        kw["softmax_scale"] = scale
    if draw(st.booleans()):
        kw["return_lse"] = True
    return Call(attnkit.piecewise_attention, [q1, k1, q2, k2, v, threshold], kw)


# ---- mutations: each makes one argument invalid and names it --------------------------------------------------

BAD_FLAGS = ["no", 1, 0, None, 1.0]
BAD_SCALES = [float("nan"), float("inf"), "0.5", 3e38, -1e300, 10**400, True]
BAD_SOFTCAPS = [-1.0, float("inf"), 1e39, "1", float("nan")]
BAD_DROPOUTS = [1.0, -0.1, float("nan"), "0.1", 10**400]
BAD_WINDOWS = [((-2, 0), "window_size[0]"), ((0, -5), "window_size[1]"), ((1.5, 0), "window_size[0]"),
               ((0, "1"), "window_size[1]"), ((True, 0), "window_size[0]"), ((1, 2, 3), "window_size"),
               (4, "window_size"), (None, "window_size")]  # fmt: skip


def _replace_arg(call: Call, index: int, value, name: str) -> Call:
    args = list(call.args)
    args[index] = value
    return Call(call.fn, args, dict(call.kwargs), name)


def _with_kw(call: Call, name: str, value, expect: str) -> Call:
    return Call(call.fn, list(call.args), {**call.kwargs, name: value}, expect)


def _common_mutations(draw, call: Call, tensor_names: list[str]) -> list[Callable[[], Call]]:
    q = call.args[0]
    i = draw(st.integers(0, len(tensor_names) - 1))
    name = tensor_names[i]
    x = call.args[i]
    window, wname = draw(st.sampled_from(BAD_WINDOWS))
    return [
        lambda: _replace_arg(call, i, x.tolist(), name),
        lambda: _replace_arg(call, i, x[..., None], name),
        lambda: _replace_arg(call, i, x.to(torch.int32), f"{name}.dtype"),
        lambda: _replace_arg(call, i, x.to(torch.float16 if x.dtype != torch.float16 else torch.float32), "dtype"),
        lambda: _replace_arg(call, 0, torch.zeros(*q.shape[:-1], 2 * q.shape[-1] + 1, dtype=q.dtype)[..., ::2], "q"),
        lambda: _replace_arg(call, 0, torch.empty(q.shape, dtype=q.dtype, device="meta"), "q"),
        lambda: _with_kw(call, "causal", draw(st.sampled_from(BAD_FLAGS)), "causal"),
        lambda: _with_kw(call, "return_lse", draw(st.sampled_from(BAD_FLAGS)), "return_lse"),
        lambda: _with_kw(call, "softmax_scale", draw(st.sampled_from(BAD_SCALES)), "softmax_scale"),
        lambda: _with_kw(call, "backend", draw(st.sampled_from(["bogus", 7, ["reference", 3], ""])), "backend"),
    ] + (
        []
        if call.fn is attnkit.piecewise_attention
        else [
            lambda: _with_kw(call, "window_size", window, wname),
            lambda: _with_kw(call, "softcap", draw(st.sampled_from(BAD_SOFTCAPS)), "softcap"),
            lambda: _with_kw(call, "dropout_p", draw(st.sampled_from(BAD_DROPOUTS)), "dropout_p"),
            lambda: _with_kw(call, "deterministic", draw(st.sampled_from(BAD_FLAGS)), "deterministic"),
            lambda: _with_kw(call, "alibi_slopes", torch.rand(q.shape[-2] + 1), "alibi_slopes"),
            lambda: _with_kw(call, "alibi_slopes", torch.rand(q.shape[-2], dtype=torch.float64), "alibi_slopes"),
            lambda: _with_kw(call, "alibi_slopes", [0.5] * q.shape[-2], "alibi_slopes"),
        ]
    )


def _varlen_mutations(draw, call: Call) -> list[Callable[[], Call]]:
    q, cq, ck = call.args[0], call.args[3], call.args[4]
    total_q = q.shape[0]
    return (
        [
            lambda: _replace_arg(call, 3, cq.long(), "cu_seqlens_q"),
            lambda: _replace_arg(call, 4, ck.tolist(), "cu_seqlens_k"),
            lambda: _replace_arg(call, 3, cq[None], "cu_seqlens_q"),
            lambda: _replace_arg(call, 3, cq[:1], "cu_seqlens_q"),
            lambda: _replace_arg(call, 3, cq + 1, "cu_seqlens_q"),
            lambda: _replace_arg(call, 4, torch.cat([ck, ck[-1:] - 1]), "cu_seqlens"),
            lambda: _replace_arg(call, 3, torch.cat([cq[:-1], cq.new_tensor([total_q + 5])]), "cu_seqlens_q"),
            lambda: _replace_arg(call, 4, torch.cat([ck, ck[-1:]]), "cu_seqlens"),
            lambda: _replace_arg(call, 5, draw(st.sampled_from([-1, 2.0, "4", True, None])), "max_seqlen_q"),
            lambda: _replace_arg(call, 6, draw(st.sampled_from([-3, 1.5, None])), "max_seqlen_k"),
        ]
        + ([lambda: _replace_arg(call, 5, 0, "max_seqlen_q")] if int((cq[1:] - cq[:-1]).max()) > 0 else [])
        + (
            # negated offsets are invalid only where some offset is not 0 (all-empty sequences: -ck == ck)
            [lambda: _replace_arg(call, 4, -ck, "cu_seqlens_k")] if int(ck.abs().max()) > 0 else []
        )
    )


def _piecewise_mutations(draw, call: Call) -> list[Callable[[], Call]]:
    q2, k2 = call.args[2], call.args[3]
    return [
        lambda: _replace_arg(call, 5, draw(st.sampled_from([2.5, True, "3", None, float("inf")])), "dist_threshold"),
        lambda: _replace_arg(call, 2, q2[..., :-1], "q2"),
        lambda: _replace_arg(call, 3, torch.cat([k2, k2], dim=1), "k2"),
    ]


@st.composite
def calls(draw, op: str, backend: str) -> Call:
    call = draw({"attention": dense_calls, "varlen": varlen_calls, "piecewise": piecewise_calls}[op](backend))
    if draw(st.integers(0, 2)) < 2:  # two valid calls for one invalid
        return call
    names = {"attention": ["q", "k", "v"], "varlen": ["q", "k", "v"], "piecewise": ["q1", "k1", "q2", "k2", "v"]}
    mutations = _common_mutations(draw, call, names[op])
    if op == "varlen":
        mutations += _varlen_mutations(draw, call)
    if op == "piecewise":
        mutations += _piecewise_mutations(draw, call)
    return draw(st.sampled_from(mutations))()


# ---- judging -----------------------------------------------------------------------------------------------------


def _snapshot(values) -> list:
    return [v.clone() if isinstance(v, torch.Tensor) and v.device.type != "meta" else v for v in values]


def _unchanged(before: list, after: list) -> bool:
    for a, b in zip(before, after):
        if isinstance(a, torch.Tensor) and a.device.type != "meta":
            if not torch.equal(a.nan_to_num(1.5), b.nan_to_num(1.5)):
                return False
    return True


def _expect_error(call: Call, backend: str) -> None:
    kwargs = {"backend": backend, **call.kwargs}
    before = _snapshot([*call.args, *kwargs.values()])
    with pytest.raises(AttnkitError) as info:
        call.fn(*call.args, **kwargs)
    err = info.value
    assert isinstance(err, ValueError | TypeError), f"{type(err).__name__} is neither a ValueError nor a TypeError"
    assert call.expect in str(err), f"the error does not name {call.expect!r}: {err}"
    assert _unchanged(before, [*call.args, *kwargs.values()]), "a failed call changed its inputs"


def _reference_call(call: Call, upcast: bool):
    args, kw = list(call.args), dict(call.kwargs)
    if call.fn is attnkit.attention:
        return attention_ref(*args, upcast=upcast, **kw)
    if call.fn is attnkit.attention_varlen:
        return attention_varlen_ref(*args, upcast=upcast, **kw)
    return piecewise_attention_ref(*args, upcast=upcast, **kw)


def _expect_match(call: Call, backend: str) -> None:
    dtype = call.args[0].dtype
    out = call.fn(*call.args, backend=backend, **call.kwargs)
    exact = _reference_call(call, upcast=True)
    plain = _reference_call(call, upcast=False)
    if call.kwargs.get("return_lse"):
        (out, lse), (exact, exact_lse), (plain, _) = out, exact, plain
        finite = torch.isfinite(exact_lse)
        assert torch.equal(torch.isfinite(lse), finite), "lse is -inf exactly where no key is visible"
        if bool(finite.any()):
            err = float((lse.double() - exact_lse)[finite].abs().max())
            assert err <= 1e-2 if dtype in (torch.float16, torch.bfloat16) else err <= 1e-4, f"lse error {err}"
    assert out.shape == exact.shape and out.dtype == dtype
    ok, err, allowed = within_tolerance(out, exact, plain, factor=2.0, atol=ATOL[dtype])
    assert ok, f"output error {err:.3g} > allowed {allowed:.3g}"
    if call.fn is attnkit.attention_varlen:
        # Rows past cu_seqlens_q[-1] belong to no sequence: 0, whatever NaN the padding holds.
        end = int(call.args[3][-1])
        assert bool((out[end:] == 0).all())


def _judge(call: Call, backend: str) -> None:
    if call.expect is None:
        _expect_match(call, backend)
    else:
        _expect_error(call, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_fuzz_attention(backend, data):
    _skip_unless_runs(backend)
    _judge(data.draw(calls("attention", backend)), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_fuzz_attention_varlen(backend, data):
    _skip_unless_runs(backend)
    _judge(data.draw(calls("varlen", backend)), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_fuzz_piecewise_attention(backend, data):
    _skip_unless_runs(backend)
    _judge(data.draw(calls("piecewise", backend)), backend)


def test_fuzz_strategies_draw_both_kinds():
    """The strategies do produce valid calls and invalid ones of every operator (a fuzz that never reaches one of
    them would pass for nothing)."""
    seen: set[tuple[str, bool]] = set()

    @settings(max_examples=200, database=None, derandomize=True)  # the same draws every run: no flaky miss
    @given(data=st.data())
    def collect(data):
        for op in ("attention", "varlen", "piecewise"):
            seen.add((op, data.draw(calls(op, "reference")).expect is None))

    collect()
    assert seen == {(op, valid) for op in ("attention", "varlen", "piecewise") for valid in (True, False)}
