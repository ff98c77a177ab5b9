"""float8_e4m3fn inputs with descales (attnkit.fp8): semantics on the reference backend, input checks, dispatch.

The reference backend defines an fp8 call as exact attention of the dequantized inputs (``x.float() *
descale[b, h // group]``); here it is checked against Python loops over the dequantized values (tests/helpers.py),
which share no code with it. The kernels' own accuracy is tested in tests/triton/test_triton_fp8.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import cu_seqlens, loop_attention, qkv

import attnkit
from attnkit import InvalidArgumentError, InvalidArgumentTypeError, fp8
from attnkit.dispatch import explain
from attnkit.spec import AttentionSpec
from attnkit.testing import attention_fp8_ref, max_abs_error

E4M3 = torch.float8_e4m3fn


def fp8_qkv(b, sq, sk, hq, hk, d, dv=None, *, seed=0):
    """Quantized q, k, v and their descales. Each (batch row, KV head) slice gets its own magnitude first, so the
    descales differ a lot between slices and a descale applied to the wrong slice shows."""
    q, k, v = qkv(b, sq, sk, hq, hk, d, dv, dtype=torch.float32, seed=seed)
    gen = torch.Generator().manual_seed(seed + 99)
    for x, heads in ((q, hq), (k, hk), (v, hk)):
        mag = torch.rand(b, 1, hk, 1, generator=gen) * 4 + 0.25
        x.mul_(mag.repeat_interleave(heads // hk, dim=2))
    q8, qd = fp8.quantize(q, hk)
    k8, kd = fp8.quantize(k)
    v8, vd = fp8.quantize(v)
    return (q8, k8, v8), dict(q_descale=qd, k_descale=kd, v_descale=vd)


def dequantized(tensors, scales):
    q8, k8, v8 = tensors
    return (
        fp8.dequantize(q8, scales["q_descale"], torch.float64),
        fp8.dequantize(k8, scales["k_descale"], torch.float64),
        fp8.dequantize(v8, scales["v_descale"], torch.float64),
    )


# ---- helpers of attnkit.fp8 ----------------------------------------------------------------------------------


def test_quantize_round_trip_and_group_descales():
    x = torch.randn(2, 9, 6, 16) * torch.tensor([1.0, 50.0])[:, None, None, None]
    x8, descale = fp8.quantize(x, num_heads_k=3)
    assert x8.dtype == E4M3 and descale.shape == (2, 3) and descale.dtype == torch.float32
    # amax of each (b, kv group) maps to e4m3's largest value; the round trip is within e4m3's relative step.
    grouped = x.abs().unflatten(2, (3, 2)).amax(dim=(1, 3, 4))
    torch.testing.assert_close(descale, grouped / 448.0)
    back = fp8.dequantize(x8, descale)
    assert ((back - x).abs() <= x.abs() * 2**-4 + descale.max() * 2**-9).all()
    zeros8, zd = fp8.quantize(torch.zeros(1, 3, 2, 4))
    assert (zd == 1).all() and (zeros8.float() == 0).all()


# ---- semantics (reference backend) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "b,sq,sk,hq,hk,d,dv,kw",
    [
        (2, 5, 7, 4, 2, 8, None, dict(causal=True)),
        (1, 7, 3, 3, 1, 16, 8, dict(causal=True)),  # Sq > Sk: first rows see nothing
        (2, 1, 9, 2, 2, 8, None, dict()),
        (1, 6, 11, 4, 4, 8, None, dict(window_size=(2, 1))),
        (2, 4, 6, 2, 1, 8, None, dict(softcap=1.5, alibi=True)),
        (1, 5, 5, 2, 1, 8, None, dict(softmax_scale=-0.4)),
    ],
)
def test_reference_is_attention_of_dequantized_inputs(b, sq, sk, hq, hk, d, dv, kw):
    tensors, scales = fp8_qkv(b, sq, sk, hq, hk, d, dv, seed=sq + sk)
    kw = dict(kw)
    slopes = torch.rand(hq) if kw.pop("alibi", False) else None
    out, lse = attnkit.attention(
        *tensors, **scales, **kw, alibi_slopes=slopes, out_dtype=torch.float32, return_lse=True, backend="reference"
    )
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    window = kw.pop("window_size", (-1, -1))
    scale = kw.pop("softmax_scale", None)
    want, want_lse = loop_attention(*dequantized(tensors, scales), window=window, scale=scale, slopes=slopes, **kw)
    assert max_abs_error(out, want) < 1e-5
    assert max_abs_error(lse, want_lse) < 1e-5


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16, torch.float32])
def test_out_dtype(out_dtype):
    tensors, scales = fp8_qkv(1, 6, 6, 2, 1, 8)
    out = attnkit.attention(*tensors, **scales, out_dtype=out_dtype, backend="reference")
    assert out.dtype == (out_dtype or torch.bfloat16)
    exact = attention_fp8_ref(*tensors, **scales)
    rounding = {torch.float32: 1e-6, torch.float16: 2**-11}.get(out_dtype, 2**-8)  # half an ulp, relative
    assert max_abs_error(out, exact) <= rounding * float(exact.abs().max())


def test_missing_descales_mean_one():
    tensors, scales = fp8_qkv(2, 5, 6, 2, 2, 8)
    out = attnkit.attention(*tensors, k_descale=scales["k_descale"], out_dtype=torch.float32, backend="reference")
    q8, k8, v8 = tensors
    want = attnkit.attention(q8.double(), fp8.dequantize(k8, scales["k_descale"], torch.float64), v8.double())
    assert max_abs_error(out, want) < 1e-6 * float(want.abs().max())


def test_varlen_is_per_sequence_dense_with_that_rows_descales():
    lens_q, lens_k = [3, 0, 5], [4, 2, 6]
    hq, hk, d = 4, 2, 8
    q, k, v = (torch.randn(sum(n), h, d) * 3 for n, h in ((lens_q, hq), (lens_k, hk), (lens_k, hk)))
    q8, k8, v8 = (x.to(E4M3) for x in (q, k, v))
    qd, kd, vd = (torch.rand(3, hk) + 0.5 for _ in range(3))
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out, lse = attnkit.attention_varlen(
        q8, k8, v8, cq, ck, 5, 6, q_descale=qd, k_descale=kd, v_descale=vd, causal=True, return_lse=True,
        out_dtype=torch.float32, backend="reference",
    )  # fmt: skip
    for bi in range(3):
        rq, rk = slice(int(cq[bi]), int(cq[bi + 1])), slice(int(ck[bi]), int(ck[bi + 1]))
        if rq.start == rq.stop:
            continue
        one = attnkit.attention(
            q8[None, rq], k8[None, rk], v8[None, rk], q_descale=qd[bi : bi + 1], k_descale=kd[bi : bi + 1],
            v_descale=vd[bi : bi + 1], causal=True, return_lse=True, out_dtype=torch.float32, backend="reference",
        )  # fmt: skip
        assert max_abs_error(out[rq], one[0][0]) < 1e-6
        assert max_abs_error(lse[:, rq], one[1][0]) < 1e-6


@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged"])
def test_kvcache_appends_fp8_and_attends_dequantized(layout):
    b, hq, hk, d, page = 2, 4, 2, 8, 16
    lens = torch.tensor([5, 17], dtype=torch.int32)
    q8 = (torch.randn(b, 2, hq, d) * 2).to(E4M3)
    k_new, v_new = ((torch.randn(b, 2, hk, d) * 2).to(E4M3) for _ in range(2))
    kw = dict(cache_seqlens=lens, causal=True, out_dtype=torch.float32, backend="reference")
    scales = dict(q_descale=torch.rand(b, hk) + 0.5, k_descale=torch.rand(b, hk) + 0.5, v_descale=torch.rand(b, hk))
    if layout == "paged":
        k_cache, v_cache = ((torch.randn(6, page, hk, d) * 2).to(E4M3) for _ in range(2))
        kw["block_table"] = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
    else:
        k_cache, v_cache = ((torch.randn(3 if layout == "batch_idx" else b, 32, hk, d) * 2).to(E4M3) for _ in range(2))
        if layout == "batch_idx":
            kw["cache_batch_idx"] = torch.tensor([2, 0], dtype=torch.int32)
    out = attnkit.attention_with_kvcache(q8, k_cache, v_cache, k_new, v_new, **scales, **kw)
    assert out.dtype == torch.float32 and k_cache.dtype == E4M3
    for bi in range(b):
        n = int(lens[bi]) + 2
        if layout == "paged":
            rows = kw["block_table"][bi].long()
            keys, vals = (c[rows].flatten(0, 1)[:n] for c in (k_cache, v_cache))
        else:
            row = int(kw["cache_batch_idx"][bi]) if layout == "batch_idx" else bi
            keys, vals = k_cache[row, :n], v_cache[row, :n]
        assert torch.equal(keys[n - 2 :].view(torch.uint8), k_new[bi].view(torch.uint8))
        want = attnkit.attention(
            q8[bi : bi + 1], keys[None], vals[None], **{name: s[bi : bi + 1] for name, s in scales.items()},
            causal=True, out_dtype=torch.float32, backend="reference",
        )  # fmt: skip
        assert max_abs_error(out[bi], want[0]) < 1e-6


def test_empty_inputs_give_zeros_in_out_dtype():
    q8, k8, v8 = (torch.zeros(2, n, 2, 8, dtype=E4M3) for n in (0, 5, 5))
    out, lse = attnkit.attention(q8, k8, v8, return_lse=True, out_dtype=torch.float16)
    assert out.shape == (2, 0, 2, 8) and out.dtype == torch.float16 and lse.shape == (2, 2, 0)
    out, lse = attnkit.attention(k8, q8[:, :0], q8[:, :0], return_lse=True)
    assert out.dtype == torch.bfloat16 and (out == 0).all() and torch.isneginf(lse).all()


def test_nan_propagates_and_fully_masked_rows_are_zero():
    tensors, scales = fp8_qkv(1, 6, 3, 2, 2, 8)
    q8 = tensors[0].clone()
    q8[0, 5, 0, 0] = float("nan")
    out, lse = attnkit.attention(q8, *tensors[1:], **scales, causal=True, return_lse=True, backend="reference")
    assert out[0, :3].eq(0).all() and torch.isneginf(lse[0, :, :3]).all()  # Sq > Sk, causal: no visible key
    assert out[0, 5, 0].isnan().all() and not out[0, :5].isnan().any() and not out[0, 5, 1].isnan().any()


# ---- input checks ------------------------------------------------------------------------------------------


def _raises(exc, fn, *words):
    with pytest.raises(exc) as info:
        fn()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_mixed_fp8_and_other_dtypes_are_refused():
    (q8, k8, v8), scales = fp8_qkv(1, 4, 4, 2, 1, 8)
    bf = v8.to(torch.bfloat16)
    _raises(TypeError, lambda: attnkit.attention(q8, k8, bf, **scales), "q is float8_e4m3fn", "v is bfloat16")
    _raises(TypeError, lambda: attnkit.attention(bf.expand(1, 4, 2, 8), k8, v8), "k is float8_e4m3fn", "q is")
    _raises(
        InvalidArgumentTypeError,
        lambda: attnkit.attention_varlen(q8[0], k8[0], bf[0], cu_seqlens([4]), cu_seqlens([4]), 4, 4),
        "bfloat16",
    )
    kc = torch.zeros(1, 16, 1, 8, dtype=E4M3)
    new_bf = torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16)
    _raises(TypeError, lambda: attnkit.attention_with_kvcache(q8, kc, kc.bfloat16()), "v_cache is bfloat16")
    before = kc.clone()
    _raises(
        TypeError,
        lambda: attnkit.attention_with_kvcache(q8, kc, kc, new_bf, new_bf, cache_seqlens=0),
        "k is bfloat16",
    )
    assert torch.equal(kc.view(torch.uint8), before.view(torch.uint8))


def test_other_float8_formats_are_refused():
    x = torch.zeros(1, 4, 1, 8, dtype=torch.float8_e5m2)
    _raises(InvalidArgumentTypeError, lambda: attnkit.attention(x, x, x), "float8_e5m2", "float8_e4m3fn")


@pytest.mark.parametrize(
    "name,value,exc,words",
    [
        ("q_descale", torch.ones(2), InvalidArgumentError, ["q_descale", "(2,)", "(1, 2)"]),
        ("k_descale", torch.ones(2, 1), InvalidArgumentError, ["k_descale", "(2, 1)", "(batch, nheads_k)"]),
        ("v_descale", torch.ones(1, 2, dtype=torch.float64), InvalidArgumentTypeError, ["v_descale", "float64"]),
        ("q_descale", [[1.0, 1.0]], InvalidArgumentTypeError, ["q_descale", "list"]),
        ("k_descale", torch.ones(1, 2, dtype=torch.bfloat16), InvalidArgumentTypeError, ["bfloat16", "float32"]),
    ],
)
def test_bad_descales(name, value, exc, words):
    (q8, k8, v8), _ = fp8_qkv(1, 4, 4, 4, 2, 8)
    _raises(exc, lambda: attnkit.attention(q8, k8, v8, **{name: value}), *words)


def test_descales_and_out_dtype_need_fp8_inputs():
    q, k, v = qkv(1, 4, 4, 2, 1, 8, dtype=torch.bfloat16)
    _raises(InvalidArgumentError, lambda: attnkit.attention(q, k, v, v_descale=torch.ones(1, 1)), "v_descale")
    _raises(InvalidArgumentError, lambda: attnkit.attention(q, k, v, out_dtype=torch.float32), "out_dtype")
    assert attnkit.attention(q, k, v, out_dtype=torch.bfloat16).dtype == torch.bfloat16  # its own dtype: fine
    (q8, k8, v8), _ = fp8_qkv(1, 4, 4, 2, 1, 8)
    _raises(InvalidArgumentTypeError, lambda: attnkit.attention(q8, k8, v8, out_dtype=E4M3), "out_dtype")
    _raises(InvalidArgumentTypeError, lambda: attnkit.attention(q8, k8, v8, out_dtype="bf16"), "out_dtype")


def test_gradients_are_refused():
    (q8, k8, v8), scales = fp8_qkv(1, 4, 4, 2, 1, 8)
    q8.requires_grad_()
    _raises(InvalidArgumentError, lambda: attnkit.attention(q8, k8, v8, **scales), "forward only", "q")
    with torch.no_grad():
        attnkit.attention(q8, k8, v8, **scales)
    q8 = q8.detach()
    scales["v_descale"].requires_grad_()
    _raises(InvalidArgumentError, lambda: attnkit.attention(q8, k8, v8, **scales), "v_descale")


def test_learnable_sink_with_fp8_is_refused():
    (q8, k8, v8), scales = fp8_qkv(1, 4, 4, 2, 1, 8)
    sink = torch.zeros(2)
    _raises(
        InvalidArgumentError, lambda: attnkit.attention(q8, k8, v8, **scales, learnable_sink=sink), "learnable_sink"
    )
    cu = cu_seqlens([4])
    _raises(
        InvalidArgumentError,
        lambda: attnkit.attention_varlen(q8[0], k8[0], v8[0], cu, cu, 4, 4, learnable_sink=sink.requires_grad_()),
        "learnable_sink",
    )


def test_readme_fp8_snippet_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## FP8 inputs") :]
    (block,) = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 1)], flags=re.S)
    scope: dict = {}
    exec(compile(block, "README fp8 snippet", "exec"), scope)
    assert scope["out"].dtype == torch.bfloat16 and scope["out"].shape == scope["q"].shape


def test_kvcache_rotary_with_fp8_is_refused_before_writing():
    q8 = torch.zeros(1, 1, 2, 8, dtype=E4M3)
    kc = torch.zeros(1, 16, 2, 8, dtype=E4M3)
    vc = torch.zeros(1, 16, 2, 8, dtype=E4M3)
    new = torch.ones(1, 1, 2, 8).to(E4M3)
    cos = sin = torch.ones(16, 4)

    def call():
        attnkit.attention_with_kvcache(q8, kc, vc, new, new, cache_seqlens=0, rotary_cos=cos, rotary_sin=sin)

    _raises(InvalidArgumentError, call, "rotary")
    assert (kc.float() == 0).all() and (vc.float() == 0).all()


# ---- dispatch ------------------------------------------------------------------------------------------------


def _spec(cc, op="attention", hip=False):
    return AttentionSpec(
        op=op, device_type="cuda", compute_capability=cc, is_hip=hip, dtype=E4M3, head_dim=128, head_dim_v=128,
        num_heads_q=8, num_heads_k=2, batch=2, seqlen_q=4096, seqlen_k=4096, features=frozenset({"fp8", "gqa"}),
    )  # fmt: skip


def test_fp8_support_is_declared_as_data_and_others_say_why_not(monkeypatch):
    """dtype float8_e4m3fn plus the ``fp8`` feature in the capabilities: the reference, triton_cuda (sm_90+) and
    cupy_cuda (Hopper, dense calls) take fp8 calls; triton_rocm names both as missing. Availability (GPU,
    packages) is taken out of the picture."""
    backends = {name: attnkit.registry.REGISTRY.get(name) for name in ("cupy_cuda", "triton_cuda", "triton_rocm")}
    for be in backends.values():
        monkeypatch.setattr(be, "unavailable_reason", lambda: None)
    assert explain(_spec((9, 0)))["reference"] == []
    assert backends["triton_cuda"].why_not(_spec((9, 0))) == []
    assert backends["triton_cuda"].why_not(_spec((9, 0), op="paged_kvcache")) == []
    assert backends["triton_cuda"].why_not(_spec((8, 0))) == [
        "fp8 needs compute capability >= 9.0 (fp8 tensor cores), this GPU is 8.0"
    ]
    assert backends["cupy_cuda"].why_not(_spec((9, 0))) == []
    assert any("Hopper" in r for r in backends["cupy_cuda"].why_not(_spec((8, 9))))
    assert any("dense attention calls only" in r for r in backends["cupy_cuda"].why_not(_spec((9, 0), op="varlen")))
    reasons = backends["triton_rocm"].why_not(_spec((9, 0), hip=True))
    assert any("dtype float8_e4m3fn not supported" in r for r in reasons), reasons
    assert "feature(s) fp8 not supported" in reasons, reasons


def test_auto_on_cpu_runs_fp8_on_the_reference():
    (q8, k8, v8), scales = fp8_qkv(1, 4, 4, 2, 1, 8)
    assert attnkit.attention(q8, k8, v8, **scales).dtype == torch.bfloat16
    spec = AttentionSpec(
        op="attention", device_type="cpu", compute_capability=None, is_hip=False, dtype=E4M3, head_dim=8,
        head_dim_v=8, num_heads_q=2, num_heads_k=1, batch=1, seqlen_q=4, seqlen_k=4, features=frozenset({"fp8"}),
    )  # fmt: skip
    assert attnkit.select_backend(spec, "auto").name == "reference"


def test_compile_fp8_attention():
    (q8, k8, v8), scales = fp8_qkv(1, 5, 7, 2, 1, 8)

    def fn(q, k, v, qd, kd, vd):
        return attnkit.attention(q, k, v, q_descale=qd, k_descale=kd, v_descale=vd, backend="reference") * 2

    attnkit.list_backends()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        args = (q8, k8, v8, scales["q_descale"], scales["k_descale"], scales["v_descale"])
        torch.testing.assert_close(compiled(*args), fn(*args))
    finally:
        torch._dynamo.reset()
