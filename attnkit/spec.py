"""What a call asks for, as data: the input to backend eligibility and dispatch."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Feature names used in AttentionSpec.features and BackendCapabilities.features.
FEATURES = (
    "causal",  # causal mask (bottom-right aligned)
    "window",  # sliding window other than plain causal
    "alibi",
    "softcap",
    "dropout",
    "gqa",  # Hq != Hk
    "dv_ne_d",  # value head dim differs from qk head dim
    "deterministic",  # deterministic backward requested
    "sink",  # learnable attention sink: a per-head logit in the softmax denominator
    "fp8",  # float8_e4m3fn inputs with descales (attnkit.fp8), forward only
)

# A call's features as one int (bit i = FEATURES[i]): a cheap part of the dispatch cache key.
_FEATURE_SETS: dict[int, frozenset[str]] = {}


def feature_bits(
    causal: bool,
    window: bool,
    alibi: bool,
    softcap: bool,
    dropout: bool,
    gqa: bool,
    dv_ne_d: bool,
    deterministic: bool,
    sink: bool = False,
    fp8: bool = False,
) -> int:
    """The features in use as a bit mask, in the order of :data:`FEATURES` (positional: it runs on every call)."""
    return (
        causal
        | window << 1
        | alibi << 2
        | softcap << 3
        | dropout << 4
        | gqa << 5
        | dv_ne_d << 6
        | deterministic << 7
        | sink << 8
        | fp8 << 9
    )


def features_from_bits(bits: int) -> frozenset[str]:
    found = _FEATURE_SETS.get(bits)
    if found is None:
        found = _FEATURE_SETS[bits] = frozenset(f for i, f in enumerate(FEATURES) if bits >> i & 1)
    return found


# Operators. Each backend lists those it implements.
OPS = ("attention", "varlen", "kvcache", "paged_kvcache", "piecewise", "merge")  # merge: merge_attention_states


@dataclass(frozen=True)
class AttentionSpec:
    """Everything dispatch needs to know about one call. Hashable, so decisions are cached per spec."""

    op: str
    device_type: str
    compute_capability: tuple[int, int] | None  # None off CUDA/ROCm devices
    is_hip: bool
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    num_heads_q: int
    num_heads_k: int
    batch: int
    seqlen_q: int  # max over sequences for varlen
    seqlen_k: int
    features: frozenset[str] = frozenset()
    requires_grad: bool = False
    # The backward will be given an out/lse merged from several calls (attnkit.distributed's blocks), not its own
    # forward's: only backends that compute gradients from the given out and lse can run it.
    merged_backward: bool = False

    def describe(self) -> str:
        cc = f" sm_{self.compute_capability[0]}{self.compute_capability[1]}" if self.compute_capability else ""
        hip = " (HIP)" if self.is_hip else ""
        feats = ",".join(sorted(self.features)) or "none"
        grad = (" +grad" if self.requires_grad else "") + (" (merged out/lse)" if self.merged_backward else "")
        return (
            f"{self.op} on {self.device_type}{cc}{hip}, {str(self.dtype).removeprefix('torch.')}, "
            f"B={self.batch} Sq={self.seqlen_q} Sk={self.seqlen_k} Hq={self.num_heads_q} Hk={self.num_heads_k} "
            f"D={self.head_dim} Dv={self.head_dim_v}, features={feats}{grad}"
        )


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index)


def is_hip() -> bool:
    return getattr(torch.version, "hip", None) is not None
