"""The reference backend: every operator and feature, any device PyTorch runs on; the last resort of ``auto``."""

from __future__ import annotations

import torch

from attnkit.registry import Backend, BackendCapabilities
from attnkit.spec import FEATURES, OPS

from . import core, fp8, merge, ops


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0
    description = (
        f"pure PyTorch, chunked online softmax ({core.QUERY_CHUNK}x{core.KEY_CHUNK} score tiles), fp32 accumulation"
    )
    capabilities = BackendCapabilities(
        device_types=frozenset({"cpu", "cuda", "mps", "xpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn}),
        ops=frozenset(OPS),
        features=frozenset(FEATURES),
        min_head_dim=1,
        max_head_dim=256,
    )

    def forward(self, q, k, v, alibi_slopes, params, varlen, learnable_sink=None):
        return ops.forward(q, k, v, alibi_slopes, params, varlen, ops.compute_dtype_for(q.dtype), learnable_sink)

    def backward(self, dout, q, k, v, out, lse, alibi_slopes, params, varlen):
        return ops.backward(dout, q, k, v, out, lse, alibi_slopes, params, varlen, ops.compute_dtype_for(q.dtype))

    def forward_kvcache(self, q, k_cache, v_cache, cache, alibi_slopes, params):
        return ops.forward_kvcache(q, k_cache, v_cache, cache, alibi_slopes, params, ops.compute_dtype_for(q.dtype))

    def merge_states(self, out_parts, lse_parts, out_dtype):
        return merge.merge_states(out_parts, lse_parts, out_dtype)

    def forward_fp8(self, q, k, v, alibi_slopes, params, varlen, scales):
        return fp8.forward_fp8(q, k, v, alibi_slopes, params, varlen, scales)

    def forward_kvcache_fp8(self, q, k_cache, v_cache, cache, alibi_slopes, params, scales):
        return fp8.forward_kvcache_fp8(q, k_cache, v_cache, cache, alibi_slopes, params, scales)

    def piecewise_forward(self, q1, k1, q2, k2, v, dist_threshold, params):
        return ops.piecewise_forward(q1, k1, q2, k2, v, dist_threshold, params, ops.compute_dtype_for(q1.dtype))

    def piecewise_backward(self, dout, q1, k1, q2, k2, v, out, lse, dist_threshold, params):
        return ops.piecewise_backward(
            dout, q1, k1, q2, k2, v, out, lse, dist_threshold, params, ops.compute_dtype_for(q1.dtype)
        )

    def info(self) -> dict[str, str]:
        return {"tiles": f"{core.QUERY_CHUNK} queries x {core.KEY_CHUNK} keys", "accumulation": "fp32 (fp64 for fp64)"}
