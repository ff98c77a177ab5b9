"""The Triton merge kernel (merge_attention_states) against the reference merge: dtypes, head dims, part counts,
strided parts, empty and NaN parts. On the CPU the kernel runs in the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

import attnkit

NEG_INF = float("-inf")


def _parts(parts, batch, seqlen, heads, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    outs = torch.randn(parts, batch, seqlen, heads, dim, generator=gen).to(dtype)
    lses = torch.randn(parts, batch, heads, seqlen, generator=gen) * 4
    return outs, lses


def _both(outs, lses, **kw):
    tri = attnkit.merge_attention_states(outs, lses, backend="triton_cuda", **kw)
    ref = attnkit.merge_attention_states(outs, lses, backend="reference", **kw)
    return tri, ref


@pytest.mark.parametrize(
    "parts,batch,seqlen,heads,dim,dtype",
    [
        (2, 2, 3, 4, 64, torch.float32),
        (1, 1, 1, 8, 128, torch.bfloat16),
        (5, 3, 7, 2, 40, torch.float16),
        (3, 1, 37, 1, 1, torch.float32),
        (16, 2, 1, 32, 256, torch.bfloat16),
    ],
    ids=str,
)
def test_merge_matches_reference(parts, batch, seqlen, heads, dim, dtype):
    outs, lses = _parts(parts, batch, seqlen, heads, dim, dtype, seed=parts * 100 + dim)
    (out, lse), (ref_out, ref_lse) = _both(outs, lses)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == ref_out.shape
    # Both accumulate in float32; rounding to a half type may then land one unit of the last place apart.
    rtol = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=1e-6, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6)


def test_merge_strided_parts_out_dtype_and_varlen():
    """Parts given as non-contiguous views (heads and seqlen swapped in memory, every other part), a different
    out_dtype, and the varlen layout."""
    outs, lses = _parts(6, 2, 5, 3, 32, torch.float32, seed=7)
    strided_outs = outs.transpose(2, 3).contiguous().transpose(2, 3)[::2]
    strided_lses = lses.transpose(2, 3).contiguous().transpose(2, 3)[::2]
    assert not strided_outs.is_contiguous() and not strided_lses.is_contiguous()
    (out, lse), (ref_out, ref_lse) = _both(strided_outs, strided_lses, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, ref_lse)
    packed_outs, packed_lses = outs[:, 0], lses[:, 0]  # (P, T, H, D), (P, H, T)
    (vout, vlse), (ref_vout, ref_vlse) = _both(packed_outs, packed_lses)
    assert vout.shape == (5, 3, 32) and vlse.shape == (3, 5)
    torch.testing.assert_close(vout, ref_vout)
    torch.testing.assert_close(vlse, ref_vlse)


def test_merge_empty_and_nan_parts():
    outs, lses = _parts(3, 1, 4, 2, 16, torch.float32, seed=9)
    lses[1] = NEG_INF
    outs[1] = float("nan")  # empty part: never read
    lses[:, 0, 1, 2] = NEG_INF  # query 2, head 1: empty everywhere
    lses[2, 0, 0, 3] = float("nan")  # query 3, head 0: NaN
    (out, lse), (ref_out, ref_lse) = _both(outs, lses)
    torch.testing.assert_close(out, ref_out, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse, equal_nan=True)
    assert torch.equal(out[0, 2, 1], torch.zeros(16)) and lse[0, 1, 2] == NEG_INF
    assert torch.isnan(out[0, 3, 0]).all() and torch.isnan(lse[0, 0, 3])
    assert torch.isfinite(out[0, :3]).all()


def test_merge_reassembles_split_kv_decoding():
    """Attention over a KV cache equals the merge of attention over its two halves (the split-KV identity the
    decode kernel relies on), all on the Triton backend."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 8, 64, generator=gen)
    k_cache, v_cache = torch.randn(2, 96, 2, 64, generator=gen), torch.randn(2, 96, 2, 64, generator=gen)
    full = attnkit.attention_with_kvcache(q, k_cache, v_cache, return_lse=True, backend="triton_cuda")
    halves = [
        attnkit.attention_with_kvcache(q, k_cache[:, a:b].contiguous(), v_cache[:, a:b].contiguous(),
                                       return_lse=True, backend="triton_cuda")
        for a, b in ((0, 40), (40, 96))
    ]  # fmt: skip
    out, lse = attnkit.merge_attention_states([h[0] for h in halves], [h[1] for h in halves], backend="triton_cuda")
    torch.testing.assert_close(out, full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full[1], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_gpu(dtype):
    """Decode-sized merges on the GPU (compiled kernel) against the float64 reference merge."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for parts, batch, seqlen, heads, dim in ((2, 64, 1, 32, 128), (8, 1, 16, 32, 128), (3, 4, 1000, 8, 256)):
        outs, lses = _parts(parts, batch, seqlen, heads, dim, dtype, seed=parts)
        lses[0, :, :, ::7] = NEG_INF
        outs, lses = outs.cuda(), lses.cuda()
        out, lse = attnkit.merge_attention_states(outs, lses)
        exact, exact_lse = attnkit.merge_attention_states(outs.double(), lses.double(), backend="reference")
        tol = 1e-5 if dtype == torch.float32 else (8e-3 if dtype == torch.bfloat16 else 1e-3)
        torch.testing.assert_close(out.double(), exact, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.double(), exact_lse, atol=1e-5, rtol=1e-5)
