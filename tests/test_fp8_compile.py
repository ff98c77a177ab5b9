"""fp8 calls on the op layer of tests/test_compile.py (CPU, reference backend): ``torch.library.opcheck`` of
``fp8_attention_forward`` and ``fp8_kvcache_forward`` (schema and its mutation claims, autograd registration, fake
tensors, aot dispatch static and dynamic), ``torch.compile(fullgraph=True)`` with inductor on fp8 calls (one graph,
no break, compiled equals eager, dynamic lengths without a recompile, the cache append kept), and the forward-only
error for gradients, eager, compiled and on a direct call of the op.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, cu_seqlens, rand
from test_compile import ALL_CHECKS, _assert_one_graph, _compiled, _no_recompile

import attnkit
from attnkit import dispatch, fp8
from attnkit.errors import InvalidArgumentError
from attnkit.ops import _fp8_library

E4M3, F32, BF16, I32 = torch.float8_e4m3fn, torch.float32, torch.bfloat16, torch.int32
OPS = torch.ops.attnkit


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    attnkit.list_backends()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _quantized(b, s, h, d, hk, seed, strided=False):
    """(x_fp8, descale (b, hk)); ``strided``: laid out (b, h, s, d), contiguous only in the last dimension."""
    x8, descale = fp8.quantize(rand(b, s, h, d, dtype=F32, seed=seed), hk)
    if strided:
        x8 = x8.transpose(1, 2).contiguous().transpose(1, 2)
    return x8, descale


def _fp8_qkv(b=2, sq=5, sk=6, hq=2, hk=1, d=16, seed=0, strided=False):
    q8, qd = _quantized(b, sq, hq, d, hk, seed, strided)
    k8, kd = _quantized(b, sk, hk, d, hk, seed + 1, strided)
    v8, vd = _quantized(b, sk, hk, d, hk, seed + 2, strided)
    return (q8, k8, v8), dict(q_descale=qd, k_descale=kd, v_descale=vd)


def _attention_args(tensors, scales, *, varlen=None, alibi=None, out_dtype=BF16, dropout_p=0.0, causal=True,
                    backend="reference"):  # fmt: skip
    q, k, v = tensors
    cq, ck, mq, mk = varlen if varlen else (None, None, q.shape[-3], k.shape[-3])
    return (q, k, v, scales["q_descale"], scales["k_descale"], scales["v_descale"], cq, ck, mq, mk, alibi, out_dtype,
            q.shape[-1] ** -0.5, causal, -1, 0 if causal else -1, 0.0, dropout_p, 1234, False, backend)  # fmt: skip


# torch's schema check (SchemaCheckMode) compares every argument before and after the call with torch.allclose,
# which has no float8 kernel on the CPU: test_schema_check_cannot_compare_float8 pins that failure, and
# _assert_schema_holds checks the same claims (inputs unchanged but for the declared mutations, outputs fresh).
CHECKS = tuple(c for c in ALL_CHECKS if c != "test_schema")


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=CHECKS)
    _assert_schema_holds(op, args)


def _bits(x):
    return x.view(torch.uint8).clone() if x.dtype == E4M3 else x.clone()


def _assert_schema_holds(op, args):
    """What test_schema checks, by hand: arguments not declared mutable keep their bits, outputs alias no input."""
    mutable = {i for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write}
    before = [_bits(a) if isinstance(a, torch.Tensor) else a for a in args]
    with torch.no_grad():
        outs = op(*args)
    for i, (a, b) in enumerate(zip(args, before)):
        if isinstance(a, torch.Tensor) and i not in mutable:
            assert torch.equal(_bits(a), b), f"argument {op._schema.arguments[i].name} was written"
    storages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    for out in outs:
        assert out.untyped_storage().data_ptr() not in storages, "an output aliases an input"


# ---- opcheck --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gqa", [False, True])
def test_opcheck_fp8_attention(gqa):
    tensors, scales = _fp8_qkv(hq=2, hk=1 if gqa else 2, strided=True)
    op = OPS.fp8_attention_forward.default
    _opcheck(op, _attention_args(tensors, scales, alibi=torch.rand(2)))
    _opcheck(op, _attention_args(tensors, scales, out_dtype=F32, causal=False))
    _opcheck(op, _attention_args(tensors, scales, dropout_p=0.25))
    # a traced call's request token: the op chooses the backend itself, with the fp8 feature
    _opcheck(op, _attention_args(tensors, scales, backend=dispatch.traced_token("auto", False)))


def test_opcheck_fp8_attention_varlen():
    lens_q, lens_k = [3, 4], [5, 4]
    q8, k8, v8 = (fp8.quantize(rand(1, sum(n), h, 8, dtype=F32, seed=s), 1)[0][0]
                  for n, h, s in ((lens_q, 2, 0), (lens_k, 1, 1), (lens_k, 1, 2)))  # fmt: skip
    scales = {name: rand(2, 1, dtype=F32, seed=9 + i).abs() + 0.5 for i, name in enumerate(fp8.DESCALE_NAMES)}
    varlen = (cu_seqlens(lens_q), cu_seqlens(lens_k), 4, 5)
    _opcheck(OPS.fp8_attention_forward.default, _attention_args((q8, k8, v8), scales, varlen=varlen))


@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged", "no_append", "leftpad"])
def test_opcheck_fp8_kvcache(layout):
    """The fp8 op appends in place like kvcache_forward (declared (a!)/(b!)); opcheck verifies those claims."""
    q8, qd = _quantized(2, 1, 2, 8, 1, seed=0)
    k_new, kd = _quantized(2, 1, 1, 8, 1, seed=3)
    v_new, vd = _quantized(2, 1, 1, 8, 1, seed=4)
    lens = torch.tensor([3, 7], dtype=I32)
    idx = table = None
    if layout == "paged":
        k_cache, v_cache = (_quantized(1, 4 * 16, 1, 8, 1, seed=s)[0].view(4, 16, 1, 8) for s in (1, 2))
        table = torch.tensor([[2, 0], [3, 1]], dtype=I32)
    else:
        k_cache, v_cache = (_quantized(3, 8, 1, 8, 1, seed=s)[0] for s in (1, 2))
        if layout == "batch_idx":
            idx = torch.tensor([2, 0], dtype=I32)
        else:
            k_cache, v_cache = k_cache[:2], v_cache[:2]
    if layout == "no_append":
        k_new = v_new = None
    leftpad = torch.tensor([1, 2], dtype=I32) if layout == "leftpad" else None
    args = (q8, k_cache, v_cache, k_new, v_new, qd, kd, vd, lens, idx, table, leftpad, None, BF16, 0.5, True, -1, 0,
            0.0, 0, "reference")  # fmt: skip
    _opcheck(OPS.fp8_kvcache_forward.default, args)


def test_schema_check_cannot_compare_float8():
    """torch's own test_schema fails on float8 arguments before it checks anything (torch.allclose on float8 CPU
    tensors): the reason the checks above run it by hand. If torch gains the kernel, this test says so."""
    tensors, scales = _fp8_qkv()
    with pytest.raises(torch.testing._internal.optests.OpCheckError, match="not implemented for 'Float8_e4m3fn'"):
        torch.library.opcheck(OPS.fp8_attention_forward.default, _attention_args(tensors, scales),
                              test_utils="test_schema")  # fmt: skip


def test_fp8_ops_return_the_documented_layout():
    """Contiguous outputs in out_dtype (lse float32) whatever the inputs' strides: what the fake kernels state."""
    tensors, scales = _fp8_qkv(strided=True)
    for out_dtype in (BF16, torch.float16, F32):
        with torch.no_grad():
            out, lse = _fp8_library._call(OPS.fp8_attention_forward.default,
                                          _attention_args(tensors, scales, out_dtype=out_dtype))  # fmt: skip
        assert out.is_contiguous() and lse.is_contiguous()
        assert out.dtype == out_dtype and lse.dtype == F32 and out.shape == (2, 5, 2, 16) and lse.shape == (2, 2, 5)


# ---- gradients ------------------------------------------------------------------------------------------------


def test_gradients_through_fp8_raise_the_forward_only_error():
    tensors, scales = _fp8_qkv()
    q8 = tensors[0].clone().requires_grad_()
    with pytest.raises(InvalidArgumentError, match=r"forward only.*q require grad"):
        attnkit.attention(q8, *tensors[1:], **scales, backend="reference")
    descale = scales["k_descale"].clone().requires_grad_()
    with pytest.raises(InvalidArgumentError, match="k_descale requires grad"):
        attnkit.attention(*tensors, **dict(scales, k_descale=descale), backend="reference")

    def fn(q, k, v):
        return attnkit.attention(q, k, v, **scales, backend="reference")

    with pytest.raises(Exception, match="forward only"):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(q8, *tensors[1:])
    # The op itself, called directly: its autograd kernel refuses rather than drop the gradient.
    args = list(_attention_args(tensors, scales))
    args[4] = descale
    with pytest.raises(InvalidArgumentError, match="k_descale requires grad, but fp8 attention is forward only"):
        OPS.fp8_attention_forward.default(*args)
    with torch.no_grad():  # no gradient asked for: runs
        out, _ = OPS.fp8_attention_forward.default(*args)
    assert not out.requires_grad


# ---- inductor -------------------------------------------------------------------------------------------------


def test_inductor_fp8_attention_static():
    """fullgraph inductor around an fp8 call with descales and ALiBi, a float32 output and an op of its own after
    the attention: one graph, compiled equals eager."""
    slopes = torch.rand(4)

    def fn(q, k, v, qd, kd, vd):
        out = attnkit.attention(q, k, v, causal=True, q_descale=qd, k_descale=kd, v_descale=vd, alibi_slopes=slopes,
                                out_dtype=F32, backend="reference")  # fmt: skip
        return out * 2.0 + 1.0

    tensors, scales = _fp8_qkv(b=2, sq=37, sk=41, hq=4, hk=2, d=16, strided=True)
    args = (*tensors, *scales.values())
    _assert_one_graph(fn, *args)
    out_c = _compiled(fn, dynamic=False)(*args)
    assert out_c.dtype == F32
    assert_close(out_c, fn(*args), atol=1e-6, rtol=1e-6)


def test_inductor_fp8_attention_dynamic():
    """dynamic=True: new sequence lengths reuse the graph; default descales (None) and the bfloat16 output."""

    def fn(q, k, v):
        return attnkit.attention(q, k, v, causal=True, backend="reference").float().sum(-1)

    compiled = _compiled(fn, dynamic=True)
    for n, (sq, sk) in enumerate(((19, 23), (29, 41), (37, 37))):
        tensors, _ = _fp8_qkv(b=2, sq=sq, sk=sk, hq=4, hk=2, d=16, seed=n)
        if n == 0:
            _assert_one_graph(fn, *tensors)
        with _no_recompile(n):
            out_c = compiled(*tensors)
        assert_close(out_c, fn(*tensors), atol=1e-5, rtol=1e-5)


def test_inductor_fp8_kvcache_decode():
    """fp8 decode steps with a cache_seqlens tensor under inductor: the in-place append of fp8 keys survives
    compilation, and new lengths are new values (one graph)."""

    def step(q, k_cache, v_cache, k_new, v_new, lens, qd, kd, vd):
        return attnkit.attention_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True, q_descale=qd, k_descale=kd,
            v_descale=vd, backend="reference",
        )  # fmt: skip

    k_cache, v_cache = (_quantized(2, 40, 2, 16, 2, seed=s)[0] for s in (1, 2))
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    compiled = _compiled(step, dynamic=False)
    for n, lens in enumerate(([3, 7], [4, 8], [5, 30])):
        q, qd = _quantized(2, 1, 4, 16, 2, seed=10 * n)
        k_new, kd = _quantized(2, 1, 2, 16, 2, seed=10 * n + 1)
        v_new, vd = _quantized(2, 1, 2, 16, 2, seed=10 * n + 2)
        lens_t = torch.tensor(lens, dtype=I32)
        args = (k_new, v_new, lens_t, qd, kd, vd)
        if n == 0:
            _assert_one_graph(step, q, k_cache.clone(), v_cache.clone(), *args)
        with _no_recompile(n):
            out_c = compiled(q, k_cache, v_cache, *args)
        out_e = step(q, k_eager, v_eager, *args)
        assert out_c.dtype == BF16
        assert_close(out_c, out_e, atol=0, rtol=0)
        assert torch.equal(k_cache.view(torch.uint8), k_eager.view(torch.uint8))
        assert torch.equal(v_cache.view(torch.uint8), v_eager.view(torch.uint8))
        assert torch.equal(k_cache[1, lens[1]].view(torch.uint8), k_new[1, 0].view(torch.uint8))


def test_aot_eager_fp8_varlen():
    def fn(q, k, v, cq, ck):
        return attnkit.attention_varlen(q, k, v, cq, ck, 9, 11, causal=True, out_dtype=F32, backend="reference")

    lens_q, lens_k = [9, 4], [11, 6]
    q8, k8, v8 = (fp8.quantize(rand(1, sum(n), h, 8, dtype=F32, seed=s), 2)[0][0]
                  for n, h, s in ((lens_q, 4, 0), (lens_k, 2, 1), (lens_k, 2, 2)))  # fmt: skip
    args = (q8, k8, v8, cu_seqlens(lens_q), cu_seqlens(lens_k))
    out_c = torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
    assert_close(out_c, fn(*args), atol=0, rtol=0)


# ---- dispatch -------------------------------------------------------------------------------------------------


def test_fp8_is_a_feature_bit_of_the_dispatch_key():
    """fp8 calls and calls of the same shapes in another dtype have their own cached decisions; only fp8 ones carry
    the feature (so a backend without it is never picked for them from the cache)."""
    dispatch.clear_cache()
    tensors, scales = _fp8_qkv()
    attnkit.attention(*tensors, **scales, causal=True, backend="reference")
    attnkit.attention(*(t.to(BF16) for t in tensors), causal=True, backend="reference")
    features = {key[3]: decision.spec.features for key, decision in dispatch._DECISIONS.items()}
    assert "fp8" in features[E4M3] and "fp8" not in features[BF16]
