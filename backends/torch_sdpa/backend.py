"""``torch_sdpa``: PyTorch's scaled-dot-product-attention kernels as an attnkit backend.

The public ``torch.nn.functional.scaled_dot_product_attention`` returns no log-sum-exp, which attnkit's operators
return and its backward contract passes around, so this backend calls the ATen operators underneath it:

``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (the fused flash kernel SDPA picks on CPU;
grouped K/V heads are read in place). CPU only: a CUDA path on the memory-efficient kernel would need a backward
that re-runs the public SDPA under autograd, and autograd records nothing inside a custom op's implementation
(such a path failed the H200 GPU suite: benchmarks/results/h200_2026-12-01_trust/); on GPUs attnkit's own kernels
run.

What it supports is declared below: no window, softcap, ALiBi, sink or attnkit-reproducible dropout, equal q/k and
v head dims, and causal only where every query sees a key (``seqlen_q <= seqlen_k``). On the CPU it outranks the
reference (it is the same math in one fused kernel).
"""

from __future__ import annotations

import torch

from attnkit.params import AttentionParams, VarlenInfo
from attnkit.registry import Backend, BackendCapabilities
from attnkit.spec import AttentionSpec


def _bottom_right_mask(sq: int, sk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Additive mask of causal attention aligned to the bottom-right corner; None where plain is_causal is the
    same (sq == sk)."""
    if sq == sk:
        return None
    rows = torch.arange(sq, device=device)[:, None]
    cols = torch.arange(sk, device=device)[None, :]
    hidden = cols > rows + (sk - sq)
    return torch.zeros(sq, sk, dtype=dtype, device=device).masked_fill(hidden, float("-inf"))


class TorchSdpaBackend(Backend):
    name = "torch_sdpa"
    priority = 10
    description = "PyTorch's own fused CPU SDPA kernel, with lse"
    capabilities = BackendCapabilities(
        device_types=frozenset({"cpu"}),
        vendors=frozenset({"cpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        ops=frozenset({"attention"}),
        features=frozenset({"causal", "gqa"}),
        min_head_dim=1,
        max_head_dim=256,
        backward_ops=frozenset({"attention"}),
    )

    def extra_why_not(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        if "causal" in spec.features and spec.seqlen_q > spec.seqlen_k:
            reasons.append("causal with seqlen_q > seqlen_k leaves rows without keys, which SDPA does not zero")
        return reasons

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        varlen: VarlenInfo | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sq, sk = q.shape[1], k.shape[1]
        mask = _bottom_right_mask(sq, sk, q.dtype, q.device) if params.causal else None
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, params.causal and mask is None,
            attn_mask=mask, scale=params.softmax_scale,
        )  # fmt: skip
        return out.transpose(1, 2), lse

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        varlen: VarlenInfo | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sq, sk = q.shape[1], k.shape[1]
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = _bottom_right_mask(sq, sk, q.dtype, q.device) if params.causal else None
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), qt, kt, vt, out.transpose(1, 2), lse.contiguous(), 0.0,
            params.causal and mask is None, attn_mask=mask, scale=params.softmax_scale,
        )  # fmt: skip
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
