"""``torch_sdpa``: PyTorch's scaled-dot-product-attention kernels as an attnkit backend.

The public ``torch.nn.functional.scaled_dot_product_attention`` returns no log-sum-exp, which attnkit's operators
return and its backward contract passes around, so this backend calls the ATen operators underneath it:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (the fused flash kernel SDPA picks
  on CPU; grouped K/V heads are read in place).
* CUDA: ``aten._efficient_attention_forward`` (the memory-efficient kernel, (B, S, H, D) layout, bottom-right
  causal as mask type 2). Its backward recomputes through the public SDPA with ``causal_lower_right`` and
  autograd, which costs one more forward but needs none of the kernel's private state.

What it supports is declared below: no window, softcap, ALiBi, sink or attnkit-reproducible dropout, equal q/k and
v head dims, and causal only where every query sees a key (``seqlen_q <= seqlen_k``). On the CPU it outranks the
reference (it is the same math in one fused kernel); on GPUs attnkit's own kernels keep the lead (priority 10 <
CuPy 20 < Triton 30, from the H200 tables in the README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.params import AttentionParams, VarlenInfo
from attnkit.registry import Backend, BackendCapabilities
from attnkit.spec import AttentionSpec

_CAUSAL_FROM_BOTTOM_RIGHT = 2  # custom_mask_type of aten._efficient_attention_forward


def _bottom_right_mask(sq: int, sk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Additive mask of causal attention aligned to the bottom-right corner; None where plain is_causal is the
    same (sq == sk)."""
    if sq == sk:
        return None
    rows = torch.arange(sq, device=device)[:, None]
    cols = torch.arange(sk, device=device)[None, :]
    hidden = cols > rows + (sk - sq)
    return torch.zeros(sq, sk, dtype=dtype, device=device).masked_fill(hidden, float("-inf"))


def recompute_grads(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) by running the public SDPA again under autograd (bottom-right causal via causal_lower_right)."""
    from torch.nn.attention.bias import causal_lower_right

    sq, sk, group = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    with torch.enable_grad():
        # K/V repeated per query head, as in the forward; autograd sums the repeats' gradients into the leaves.
        leaves = [x.detach().transpose(1, 2).requires_grad_(True) for x in (q, k, v)]
        kr, vr = (x.repeat_interleave(group, dim=1) for x in leaves[1:])
        mask = causal_lower_right(sq, sk) if params.causal else None
        recomputed = F.scaled_dot_product_attention(leaves[0], kr, vr, attn_mask=mask, scale=params.softmax_scale)
        dq, dk, dv = torch.autograd.grad(recomputed, leaves, dout.transpose(1, 2))
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class TorchSdpaBackend(Backend):
    name = "torch_sdpa"
    priority = 10
    description = "PyTorch's own SDPA kernels (fused flash on CPU, memory-efficient on CUDA), with lse"
    capabilities = BackendCapabilities(
        device_types=frozenset({"cpu", "cuda"}),
        vendors=frozenset({"cpu", "nvidia"}),
        min_compute_capability=(5, 0),
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
        if spec.device_type == "cuda":
            if spec.merged_backward:
                reasons.append(
                    "its CUDA backward recomputes the forward under autograd and ignores the given out/lse, so it "
                    "cannot differentiate results merged from several calls (attnkit.distributed)"
                )
            if spec.dtype == torch.float64:
                reasons.append("float64 has no fused SDPA kernel on CUDA")
            if spec.head_dim % 8:
                reasons.append(f"head_dim={spec.head_dim}: the memory-efficient CUDA kernel needs a multiple of 8")
            cc = spec.compute_capability
            if spec.dtype == torch.bfloat16 and cc is not None and cc < (8, 0):
                reasons.append("bfloat16 needs compute capability >= 8.0 in the memory-efficient CUDA kernel")
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
        if q.device.type == "cpu":
            mask = _bottom_right_mask(sq, sk, q.dtype, q.device) if params.causal else None
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, params.causal and mask is None,
                attn_mask=mask, scale=params.softmax_scale,
            )  # fmt: skip
            return out.transpose(1, 2), lse
        group = q.shape[2] // k.shape[2]
        if group > 1:  # the efficient kernel wants equal head counts
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        out, lse, *_ = torch.ops.aten._efficient_attention_forward(
            q, k, v, None, None, None, None, None, 0.0, _CAUSAL_FROM_BOTTOM_RIGHT if params.causal else 0, True,
            scale=params.softmax_scale,
        )  # fmt: skip
        return out, lse[:, :, :sq].float()

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
        if q.device.type == "cpu":
            mask = _bottom_right_mask(sq, sk, q.dtype, q.device) if params.causal else None
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout.transpose(1, 2), qt, kt, vt, out.transpose(1, 2), lse.contiguous(), 0.0,
                params.causal and mask is None, attn_mask=mask, scale=params.softmax_scale,
            )  # fmt: skip
            return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
        return recompute_grads(dout, q, k, v, params)
