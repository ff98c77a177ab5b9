"""The Triton backends: ``triton_cuda`` (NVIDIA, sm_80+) and ``triton_rocm`` (AMD), sharing one set of kernels.

This module imports neither triton nor the kernels; :mod:`.launch` is imported on the first call, so the
backends can explain why they cannot run on machines without triton or without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import ClassVar

import torch

from attnkit.fp8 import FEATURE as FP8_FEATURE
from attnkit.fp8 import FP8_DTYPE, Fp8Scales
from attnkit.params import AttentionParams, KVCacheInfo, VarlenInfo
from attnkit.registry import Backend, BackendCapabilities
from attnkit.spec import AttentionSpec

from . import probes

_FEATURES = frozenset({"causal", "window", "alibi", "softcap", "dropout", "gqa", "dv_ne_d", "deterministic", "sink"})
_OPS = frozenset({"attention", "varlen", "piecewise", "kvcache", "paged_kvcache", "merge"})
_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
# fp8 (attnkit.fp8): triton_cuda only, on Hopper's fp8 tensor cores and later (FP8_MIN_CAPABILITY).
FP8_MIN_CAPABILITY = (9, 0)


def _launch() -> ModuleType:
    from . import launch

    return launch


class _TritonBackend(Backend):
    vendor: ClassVar[str]
    gpu_label: ClassVar[str]

    def unavailable_reason(self) -> str | None:
        if not probes.triton_installed():
            return f"triton is not installed: {probes.INSTALL_HINT}"
        if probes.interpreter_enabled():
            return None
        if not torch.cuda.is_available():
            return (
                f"no {self.gpu_label} GPU visible to torch (CPU tensors run only under the Triton interpreter, "
                "TRITON_INTERPRET=1, which is meant for tests)"
            )
        if self.vendor == "nvidia" and probes.hip_build():
            return "this torch is a ROCm build: use triton_rocm on AMD GPUs"
        if self.vendor == "amd" and not probes.hip_build():
            return "this torch is a CUDA build: use triton_cuda on NVIDIA GPUs"
        return None

    def extra_why_not(self, spec: AttentionSpec) -> list[str]:
        if spec.device_type == "cpu" and not probes.interpreter_enabled():
            return [
                "CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1 before importing "
                "triton; for tests)"
            ]
        cc = spec.compute_capability
        if FP8_FEATURE in spec.features and spec.device_type == "cuda" and cc is not None and cc < FP8_MIN_CAPABILITY:
            need = FP8_MIN_CAPABILITY
            return [
                f"fp8 needs compute capability >= {need[0]}.{need[1]} (fp8 tensor cores), this GPU is {cc[0]}.{cc[1]}"
            ]
        return []

    def why_not_auto(self, spec: AttentionSpec) -> list[str]:
        if spec.device_type == "cpu":
            return ["the Triton interpreter is for tests only; automatic choice keeps CPU calls on the reference"]
        return []

    def info(self) -> dict[str, str]:
        return probes.summary()

    # ---- kernels ---------------------------------------------------------------------------------------------
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        varlen: VarlenInfo | None,
        learnable_sink: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch().forward(q, k, v, alibi_slopes, params, varlen, self.vendor, sink=learnable_sink)

    def forward_runner(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams, keep_lse: bool
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        return _launch().forward_runner(q, k, v, params, self.vendor, keep_lse)

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
        dq, dk, dv = _launch().backward(dout, q, k, v, out, lse, alibi_slopes, params, varlen, self.vendor)
        return dq, dk, dv

    def forward_kvcache(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache: KVCacheInfo,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from . import kvcache_launch

        return kvcache_launch.forward_kvcache(q, k_cache, v_cache, cache, alibi_slopes, params)

    def append_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cache_batch_idx: torch.Tensor | None,
        block_table: torch.Tensor | None,
    ) -> torch.Tensor | None:
        from . import append_launch

        if not append_launch.fusable(k_cache, v_cache, k, v):
            return None
        return append_launch.append_kv(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)

    def check_lengths(self, lengths: torch.Tensor, low: int, high: int) -> bool:
        if not lengths.is_cuda:  # the interpreter would run it on the host, synchronously: torch ops say the same
            return False
        from . import lengths_check

        lengths_check.check(lengths, low, high)
        return True

    def kvcache_runner(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        cache_seqlens: torch.Tensor,
        block_table: torch.Tensor | None,
        params: AttentionParams,
        num_splits: int,
        keep_lse: bool,
    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor] | None] | None:
        from . import kvcache_launch

        return kvcache_launch.decode_runner(q, k_cache, v_cache, k, v, cache_seqlens, block_table, params,
                                            num_splits, keep_lse)  # fmt: skip

    def merge_states(
        self, out_parts: torch.Tensor, lse_parts: torch.Tensor, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from . import merge_launch

        return merge_launch.merge_states(out_parts, lse_parts, out_dtype)

    def forward_fp8(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        varlen: VarlenInfo | None,
        scales: Fp8Scales,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from . import fp8_launch

        return fp8_launch.forward_fp8(q, k, v, alibi_slopes, params, varlen, scales, self.vendor)

    def forward_kvcache_fp8(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache: KVCacheInfo,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        scales: Fp8Scales,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from . import kvcache_launch

        return kvcache_launch.forward_kvcache(q, k_cache, v_cache, cache, alibi_slopes, params, scales)

    def piecewise_forward(
        self,
        q1: torch.Tensor,
        k1: torch.Tensor,
        q2: torch.Tensor,
        k2: torch.Tensor,
        v: torch.Tensor,
        dist_threshold: int,
        params: AttentionParams,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch().forward(
            q1, k1, v, None, params, None, self.vendor, q2=q2, k2=k2, dist_threshold=dist_threshold
        )

    def piecewise_backward(
        self,
        dout: torch.Tensor,
        q1: torch.Tensor,
        k1: torch.Tensor,
        q2: torch.Tensor,
        k2: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dist_threshold: int,
        params: AttentionParams,
    ) -> tuple[torch.Tensor, ...]:
        return _launch().backward(
            dout, q1, k1, v, out, lse, None, params, None, self.vendor, q2=q2, k2=k2, dist_threshold=dist_threshold
        )


class TritonCudaBackend(_TritonBackend):
    name = "triton_cuda"
    priority = 30
    vendor = "nvidia"
    gpu_label = "NVIDIA"
    description = (
        "FlashAttention-2 in Triton for NVIDIA GPUs (sm_80+); deterministic backward, no atomics; fp8 forward on sm_90+"
    )
    capabilities = BackendCapabilities(
        device_types=frozenset({"cuda", "cpu"}),
        vendors=frozenset({"nvidia", "cpu"}),
        min_compute_capability=(8, 0),
        dtypes=_DTYPES | {FP8_DTYPE},
        ops=_OPS,
        features=_FEATURES | {FP8_FEATURE},
        min_head_dim=1,
        max_head_dim=256,
    )


class TritonRocmBackend(_TritonBackend):
    name = "triton_rocm"
    priority = 30
    vendor = "amd"
    gpu_label = "AMD (ROCm)"
    description = "FlashAttention-2 in Triton for AMD GPUs (ROCm), with its own tuning table; no TMA"
    capabilities = BackendCapabilities(
        device_types=frozenset({"cuda", "cpu"}),
        vendors=frozenset({"amd", "cpu"}),
        dtypes=_DTYPES,
        ops=_OPS,
        features=_FEATURES,
        min_head_dim=1,
        max_head_dim=256,
    )
