"""Bad input: every error is an AttnkitError and a ValueError/TypeError, and its message names the argument and
the value seen. Validation happens before any backend runs (or any cache is written)."""

from __future__ import annotations

import pytest
import torch
from helpers import cu_seqlens

import attnkit
from attnkit import AttnkitError, InvalidArgumentError, InvalidArgumentTypeError, KVCacheOverflowError

I32 = torch.int32


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


Q, K, V = t(2, 5, 4, 8), t(2, 7, 2, 8), t(2, 7, 2, 8)


def attn(q=Q, k=K, v=V, **kw):
    return lambda: attnkit.attention(q, k, v, backend="reference", **kw)


def varlen(lens_q=(2, 3), lens_k=(4, 3), cq=None, ck=None, mq=3, mk=4, **kw):
    q, k, v = t(sum(lens_q), 4, 8), t(sum(lens_k), 2, 8), t(sum(lens_k), 2, 8)
    cq = cu_seqlens(lens_q) if cq is None else cq
    ck = cu_seqlens(lens_k) if ck is None else ck
    return lambda: attnkit.attention_varlen(q, k, v, cq, ck, mq, mk, backend="reference", **kw)


def kvc(q=None, k_cache=None, v_cache=None, k=None, v=None, **kw):
    q = t(2, 1, 4, 8) if q is None else q
    k_cache = t(2, 16, 2, 8) if k_cache is None else k_cache
    v_cache = t(2, 16, 2, 8) if v_cache is None else v_cache
    return lambda: attnkit.attention_with_kvcache(q, k_cache, v_cache, k, v, backend="reference", **kw)


def varlen_meta():
    meta = [t(5, 4, 8, device="meta"), t(7, 2, 8, device="meta"), t(7, 2, 8, device="meta")]
    offsets = [torch.tensor(cu, dtype=I32, device="meta") for cu in ([0, 2, 5], [0, 4, 7])]
    return attnkit.attention_varlen(*meta, *offsets, 3, 4)


def pw(q1=Q, k1=K, q2=Q, k2=K, v=V, threshold=2, **kw):
    return lambda: attnkit.piecewise_attention(q1, k1, q2, k2, v, threshold, backend="reference", **kw)


VE, TE = InvalidArgumentError, InvalidArgumentTypeError

CASES = {
    # ---- shapes, dtypes, devices
    "rank": (attn(q=t(5, 4, 8)), VE, ["q", "4 dimensions", "(5, 4, 8)"]),
    "rank_v": (attn(v=t(2, 7, 2, 8, 1)), VE, ["v", "(2, 7, 2, 8, 1)"]),
    "not_a_tensor": (attn(k=[[1.0]]), TE, ["k", "list"]),
    "dtype_mix": (attn(k=t(2, 7, 2, 8, dtype=torch.float16)), TE, ["k.dtype", "float16", "float32"]),
    "int_dtype": (
        attn(
            q=t(2, 5, 4, 8, dtype=torch.int32), k=t(2, 7, 2, 8, dtype=torch.int32), v=t(2, 7, 2, 8, dtype=torch.int32)
        ),
        TE,
        ["q.dtype", "int32"],
    ),
    "bool_dtype": (attn(v=t(2, 7, 2, 8, dtype=torch.bool)), TE, ["v.dtype", "bool"]),
    "device_mix": (attn(k=t(2, 7, 2, 8, device="meta")), VE, ["k", "meta", "cpu"]),
    "head_dim_mismatch": (attn(k=t(2, 7, 2, 6), v=t(2, 7, 2, 6)), VE, ["head dim", "6", "8"]),
    "head_dim_too_big": (attn(q=t(1, 2, 1, 300), k=t(1, 2, 1, 300), v=t(1, 2, 1, 4)), VE, ["head dim", "300", "256"]),
    "heads_not_divisible": (attn(q=t(2, 5, 3, 8)), VE, ["3 heads", "2 heads"]),
    "kv_heads_differ": (attn(v=t(2, 7, 1, 8)), VE, ["v has 1 heads", "k has 2"]),
    "kv_length_mismatch": (attn(v=t(2, 6, 2, 8)), VE, ["(2, 7, 2, 8)", "(2, 6, 2, 8)"]),
    "batch_mismatch": (attn(k=t(3, 7, 2, 8), v=t(3, 7, 2, 8)), VE, ["batch", "2", "3"]),
    "non_contiguous_head_dim": (attn(q=t(2, 5, 8, 4).transpose(-1, -2)), VE, ["q", "contiguous", "strides"]),
    # ---- options
    "window_minus_two": (attn(window_size=(-2, 0)), VE, ["window_size[0]", "-2"]),
    "window_float": (attn(window_size=(1.5, 0)), VE, ["window_size[0]", "1.5"]),
    "window_right_float": (attn(window_size=(1, 2.0)), VE, ["window_size[1]", "2.0"]),
    "window_bool": (attn(window_size=(True, 0)), VE, ["window_size[0]", "True"]),
    "window_not_pair": (attn(window_size=(1, 2, 3)), TE, ["window_size", "(1, 2, 3)"]),
    "window_int": (attn(window_size=4), TE, ["window_size", "4"]),
    "causal_not_bool": (attn(causal=1), TE, ["causal", "1"]),
    "slopes_shape": (attn(alibi_slopes=t(3)), VE, ["alibi_slopes", "(3,)", "(4,)", "(2, 4)"]),
    "slopes_shape_2d": (attn(alibi_slopes=t(4, 2)), VE, ["alibi_slopes", "(4, 2)"]),
    "slopes_dtype": (attn(alibi_slopes=t(4, dtype=torch.float64)), TE, ["alibi_slopes", "float64", "float32"]),
    "slopes_not_tensor": (attn(alibi_slopes=[0.5] * 4), TE, ["alibi_slopes", "list"]),
    "slopes_device": (attn(alibi_slopes=t(4, device="meta")), VE, ["alibi_slopes", "meta"]),
    "dropout_one": (attn(dropout_p=1.0), VE, ["dropout_p", "1.0"]),
    "dropout_negative": (attn(dropout_p=-0.1), VE, ["dropout_p", "-0.1"]),
    "dropout_nan": (attn(dropout_p=float("nan")), VE, ["dropout_p", "nan"]),
    "dropout_str": (attn(dropout_p="0.1"), VE, ["dropout_p", "'0.1'"]),
    "softcap_negative": (attn(softcap=-1.0), VE, ["softcap", "-1.0"]),
    "softcap_inf": (attn(softcap=float("inf")), VE, ["softcap", "inf"]),
    "scale_nan": (attn(softmax_scale=float("nan")), VE, ["softmax_scale", "nan"]),
    "scale_inf": (attn(softmax_scale=float("-inf")), VE, ["softmax_scale", "-inf"]),
    "scale_str": (attn(softmax_scale="0.5"), VE, ["softmax_scale", "'0.5'"]),
    "return_lse_not_bool": (attn(return_lse=1), TE, ["return_lse", "1"]),
    "deterministic_not_bool": (attn(deterministic="yes"), TE, ["deterministic", "'yes'"]),
    "return_lse_str": (attn(return_lse="no"), TE, ["return_lse", "'no'"]),
    "causal_str": (attn(causal="no"), TE, ["causal", "'no'"]),
    "causal_none": (attn(causal=None), TE, ["causal", "None"]),
    "deterministic_int": (attn(deterministic=0), TE, ["deterministic", "0"]),
    "meta_q": (attn(q=t(2, 5, 4, 8, device="meta")), VE, ["q", "meta device"]),
    # ---- varlen
    "cu_dtype": (varlen(cq=torch.tensor([0, 2, 5], dtype=torch.int64)), VE, ["cu_seqlens_q", "int32", "int64"]),
    "cu_not_tensor": (varlen(cq=[0, 2, 5]), TE, ["cu_seqlens_q", "list"]),
    "cu_2d": (varlen(ck=torch.tensor([[0, 4, 7]], dtype=I32)), VE, ["cu_seqlens_k", "(1, 3)"]),
    "cu_too_short": (varlen(cq=torch.tensor([0], dtype=I32)), VE, ["cu_seqlens_q", "(1,)"]),
    "cu_not_zero_start": (
        varlen(cq=torch.tensor([1, 2, 5], dtype=I32)),
        VE,
        ["cu_seqlens_q", "[1, 2, 5]", "start at 0"],
    ),
    "cu_decreasing": (varlen(ck=torch.tensor([0, 5, 4], dtype=I32), mk=5), VE, ["cu_seqlens_k", "[0, 5, 4]"]),
    "cu_past_end": (varlen(ck=torch.tensor([0, 4, 9], dtype=I32), mk=5), VE, ["cu_seqlens_k", "9", "7"]),
    "cu_device": (varlen(cq=torch.zeros(3, dtype=I32, device="meta")), VE, ["cu_seqlens_q", "meta"]),
    "max_seqlen_small": (varlen(mq=2), VE, ["max_seqlen_q=2", "3"]),
    "max_seqlen_negative": (varlen(mk=-1), VE, ["max_seqlen_k", "-1"]),
    "max_seqlen_float": (varlen(mk=4.0), VE, ["max_seqlen_k", "4.0"]),
    "cu_count_mismatch": (varlen(lens_q=(2, 3), lens_k=(4, 2, 1)), VE, ["cu_seqlens_q has 2", "cu_seqlens_k has 3"]),
    "varlen_rank": (
        lambda: attnkit.attention_varlen(Q, K, V, cu_seqlens([5]), cu_seqlens([7]), 5, 7),
        VE,
        ["q", "3 dimensions"],
    ),
    "varlen_slopes": (varlen(alibi_slopes=t(3, 4)), VE, ["alibi_slopes", "(3, 4)", "(2, 4)"]),
    "varlen_return_lse_str": (varlen(return_lse="no"), TE, ["return_lse", "'no'"]),
    "varlen_return_lse_int": (varlen(return_lse=1), TE, ["return_lse", "1"]),
    "varlen_causal_str": (varlen(causal="yes"), TE, ["causal", "'yes'"]),
    "varlen_deterministic_str": (varlen(deterministic="no"), TE, ["deterministic", "'no'"]),
    "varlen_meta": (varlen_meta, VE, ["q", "meta device"]),
    # ---- kv cache
    "cache_overflow": (
        kvc(k=t(2, 4, 2, 8), v=t(2, 4, 2, 8), cache_seqlens=torch.tensor([3, 13], dtype=I32)),
        KVCacheOverflowError,
        ["row 1", "13", "17", "16"],
    ),
    "cache_overflow_int": (kvc(k=t(2, 4, 2, 8), v=t(2, 4, 2, 8), cache_seqlens=13), KVCacheOverflowError, ["13"]),
    "k_without_v": (kvc(k=t(2, 1, 2, 8), cache_seqlens=0), VE, ["k and v"]),
    "v_without_k": (kvc(v=t(2, 1, 2, 8), cache_seqlens=0), VE, ["k and v"]),
    "append_without_seqlens": (kvc(k=t(2, 1, 2, 8), v=t(2, 1, 2, 8)), VE, ["cache_seqlens"]),
    "seqlens_dtype": (kvc(cache_seqlens=torch.tensor([1, 2])), VE, ["cache_seqlens", "int64"]),
    "seqlens_shape": (kvc(cache_seqlens=torch.tensor([1, 2, 3], dtype=I32)), VE, ["cache_seqlens", "(3,)"]),
    "seqlens_negative": (kvc(cache_seqlens=torch.tensor([1, -2], dtype=I32)), VE, ["cache_seqlens", "-2"]),
    "cache_batch_mismatch": (kvc(k_cache=t(3, 16, 2, 8), v_cache=t(3, 16, 2, 8)), VE, ["k_cache", "3", "2"]),
    "cache_batch_idx_range": (kvc(cache_batch_idx=torch.tensor([0, 5], dtype=I32)), VE, ["cache_batch_idx", "[0, 5]"]),
    "cache_batch_idx_repeat": (
        kvc(k=t(2, 1, 2, 8), v=t(2, 1, 2, 8), cache_seqlens=0, cache_batch_idx=torch.tensor([1, 1], dtype=I32)),
        VE,
        ["cache_batch_idx", "[1, 1]"],
    ),
    "new_k_shape": (kvc(k=t(2, 1, 2, 4), v=t(2, 1, 2, 8), cache_seqlens=0), VE, ["k", "(2, 1, 2, 4)"]),
    "block_table_range": (
        kvc(
            k_cache=t(4, 16, 2, 8),
            v_cache=t(4, 16, 2, 8),
            cache_seqlens=20,
            block_table=torch.tensor([[0, 1], [2, 4]], dtype=I32),
        ),
        VE,
        ["block_table[1]", "4"],
    ),
    "block_table_dtype": (
        kvc(
            k_cache=t(4, 16, 2, 8), v_cache=t(4, 16, 2, 8), cache_seqlens=1, block_table=torch.tensor([[0, 1], [2, 3]])
        ),
        VE,
        ["block_table", "int64"],
    ),
    "page_size": (
        kvc(
            k_cache=t(4, 24, 2, 8),
            v_cache=t(4, 24, 2, 8),
            cache_seqlens=1,
            block_table=torch.tensor([[0, 1], [2, 3]], dtype=I32),
        ),
        VE,
        ["page size", "24", "16"],
    ),
    "paged_with_batch_idx": (
        kvc(
            k_cache=t(4, 16, 2, 8),
            v_cache=t(4, 16, 2, 8),
            cache_seqlens=1,
            cache_batch_idx=torch.tensor([0, 1], dtype=I32),
            block_table=torch.tensor([[0, 1], [2, 3]], dtype=I32),
        ),
        VE,
        ["cache_batch_idx", "block_table"],
    ),
    "rotary_without_k": (kvc(cache_seqlens=1, rotary_cos=t(16, 2), rotary_sin=t(16, 2)), VE, ["rotary"]),
    "rotary_missing_sin": (kvc(k=t(2, 1, 2, 8), v=t(2, 1, 2, 8), cache_seqlens=1, rotary_cos=t(16, 2)), VE, ["rotary"]),
    "rotary_too_short": (
        kvc(k=t(2, 2, 2, 8), v=t(2, 2, 2, 8), cache_seqlens=10, rotary_cos=t(11, 2), rotary_sin=t(11, 2)),
        VE,
        ["rotary_cos", "11", "12"],
    ),
    "rotary_dim_too_big": (
        kvc(k=t(2, 1, 2, 8), v=t(2, 1, 2, 8), cache_seqlens=1, rotary_cos=t(16, 5), rotary_sin=t(16, 5)),
        VE,
        ["rotary", "(16, 5)"],
    ),
    "kv_cache_dtype": (kvc(v_cache=t(2, 16, 2, 8, dtype=torch.float16)), TE, ["v_cache.dtype", "float16"]),
    # ---- piecewise
    "pw_q2_shape": (pw(q2=t(2, 5, 4, 6)), VE, ["q2", "(2, 5, 4, 6)", "(2, 5, 4, 8)"]),
    "pw_k2_shape": (pw(k2=t(2, 6, 2, 8)), VE, ["k2", "(2, 6, 2, 8)"]),
    "pw_threshold_float": (pw(threshold=2.5), TE, ["dist_threshold", "2.5"]),
    "pw_threshold_bool": (pw(threshold=True), TE, ["dist_threshold", "True"]),
    "pw_return_lse_str": (pw(return_lse="no"), TE, ["return_lse", "'no'"]),
    "pw_causal_int": (pw(causal=1), TE, ["causal", "1"]),
    "pw_meta": (pw(q1=t(2, 5, 4, 8, device="meta")), VE, ["q1", "meta device"]),
    "pw_dtype": (pw(k2=t(2, 7, 2, 8, dtype=torch.float64)), TE, ["k2.dtype", "float64"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name):
    call, exc, needles = CASES[name]
    with pytest.raises(exc) as info:
        call()
    err = info.value
    assert isinstance(err, AttnkitError)
    assert isinstance(err, ValueError | TypeError)
    text = str(err)
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


def test_error_hierarchy():
    assert issubclass(KVCacheOverflowError, InvalidArgumentError)
    for cls in (InvalidArgumentError, attnkit.EnvironmentVariableError, attnkit.BackendUnsupportedError):
        assert issubclass(cls, ValueError) and issubclass(cls, AttnkitError)
    assert issubclass(InvalidArgumentTypeError, TypeError)
    assert issubclass(attnkit.NoBackendError, RuntimeError) and issubclass(attnkit.NoBackendError, AttnkitError)
    assert issubclass(attnkit.BackendCompileError, AttnkitError)


def test_validation_happens_before_dispatch(monkeypatch):
    """A bad argument is reported as such even when no backend could run the call."""
    monkeypatch.setenv("ATTNKIT_DISABLE", "reference,torch_sdpa")
    with pytest.raises(InvalidArgumentError, match="dropout_p"):
        attnkit.attention(Q, K, V, dropout_p=2.0)
    with pytest.raises(attnkit.NoBackendError):
        attnkit.attention(Q, K, V)


def test_meta_device_is_rejected_before_dispatch():
    """Meta tensors hold no data: a clear error naming the argument, whatever backend is asked for."""
    q = t(1, 4, 2, 8, device="meta")
    for backend in ("auto", "reference", "triton_cuda"):
        with pytest.raises(InvalidArgumentError, match="q is on the meta device"):
            attnkit.attention(q, q, q, backend=backend)
