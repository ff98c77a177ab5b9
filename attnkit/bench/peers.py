"""Peers attnkit is compared with: PyTorch SDPA per backend, FlexAttention (compiled) and flash-attn.

SDPA and FlexAttention take (batch, heads, seqlen, head_dim); the providers pass transposed *views* of the
flash-attn layout tensors, so no copy enters the timed region.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from .cases import Case, scores_elements
from .interface import DeviceInfo, Kernel, NotApplicable, Provider

# SDPA's math backend upcasts fp16/bf16 to fp32 (unless allow_fp16_bf16_reduction_math_sdp is set), so its
# score matrices are fp32 whatever the input dtype.
MATH_SCORE_BYTES = 4
# Fraction of the free device memory a case may plan to use; the rest absorbs allocator fragmentation.
MEMORY_HEADROOM = 0.8


def math_bytes(case: Case, rotations: int = 1) -> int:
    """Memory SDPA-math needs for ``case``: a few score-sized (B, H, Sq, Sk) fp32 buffers.

    Forward: scores, scaled scores, softmax and a temporary (conservative: an OOM costs more than a skip).
    Backward keeps softmax (plus its input for the mask) alive per retained graph, i.e. per rotated input set,
    and needs four more for the gradient of the scores.
    """
    elt = max(MATH_SCORE_BYTES, case.element_size)
    if case.mode in ("fwd", "decode"):
        buffers = 4
    elif case.mode == "bwd":
        buffers = 2 * rotations + 4
    else:
        buffers = 6
    return buffers * scores_elements(case) * elt


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


class SdpaProvider(Provider):
    """One SDPA backend forced through ``torch.nn.attention.sdpa_kernel``."""

    BACKENDS: ClassVar[dict[str, str]] = {
        "flash": "FLASH_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "math": "MATH",
    }

    def __init__(self, short: str):
        self.short = short
        self.name = f"sdpa:{short}"

    def _backend(self):
        from torch.nn.attention import SDPBackend

        return getattr(SDPBackend, self.BACKENDS[self.short])

    def unavailable(self) -> str | None:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        except ImportError as exc:
            return f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel ({exc})"
        if not hasattr(SDPBackend, self.BACKENDS[self.short]):
            return f"torch {torch.__version__} has no SDPBackend.{self.BACKENDS[self.short]}"
        if self.short in ("cudnn", "efficient") and not torch.cuda.is_available():
            return "needs a CUDA device"
        return None

    def na_reason(self, case: Case, info: DeviceInfo) -> str | None:
        if case.causal and case.seqlen_q != case.seqlen_k:
            return "SDPA's is_causal aligns the mask top-left; flash-attn semantics align it bottom-right"
        if self.short == "math":
            need = math_bytes(case, info.rotations)
            if need > MEMORY_HEADROOM * info.free_bytes:
                return f"would need ~{_gib(need)} for (B, H, Sq, Sk) score matrices; {_gib(info.free_bytes)} free"
        return None

    def _call(self, causal: bool, gqa: bool) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        from torch.nn.attention import sdpa_kernel

        backend = self._backend()
        extra = {"enable_gqa": True} if gqa else {}

        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, **extra
                )
            return out.transpose(1, 2)

        return fn

    def build(self, case: Case, device: torch.device) -> Kernel:
        gqa = case.heads_q != case.heads_k
        reason = _probe(self._call(case.causal, gqa), case, device)
        if reason is None:
            return Kernel(self._call(case.causal, gqa), note="enable_gqa=True" if gqa else "")
        if not gqa:
            raise NotApplicable(reason)
        # No GQA kernel: the user's fallback is a cache stored with K/V repeated per query head. Repeat once,
        # outside the timed region; the kernel then reads group-times more bytes, which the timing shows.
        if _probe(self._call(case.causal, False), case, device, repeat=True) is not None:
            raise NotApplicable(reason)
        group = case.heads_q // case.heads_k
        return Kernel(self._call(case.causal, False), prepare=_repeat_kv(group),
                      note=f"no GQA kernel ({reason}); K/V repeated {group}x before timing")  # fmt: skip


def _repeat_kv(group: int):
    def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return q, k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)

    return prepare


_TRIGGERED = re.compile(r"\s*\(Triggered internally at .*", re.DOTALL)


def _probe(fn, case: Case, device: torch.device, repeat: bool = False) -> str | None:
    """Run ``fn`` on a small copy of the case (same dtype, heads, head dim, mode) and return SDPA's reasons for
    refusing it, or None. Kernel eligibility in SDPA does not depend on the sequence length, so this is cheap
    and gives the readable warnings SDPA emits instead of the bare "No available kernel"."""
    dtype, sq = case.torch_dtype, min(case.seqlen_q, 64)
    sk = min(case.seqlen_k, 64) if case.seqlen_q != case.seqlen_k else sq
    hk = case.heads_q if repeat else case.heads_k
    q = torch.randn(1, sq, case.heads_q, case.head_dim, device=device, dtype=dtype, requires_grad=case.needs_grad)
    k = torch.randn(1, sk, hk, case.head_dim, device=device, dtype=dtype, requires_grad=case.needs_grad)
    v = torch.randn(1, sk, hk, case.head_dim, device=device, dtype=dtype, requires_grad=case.needs_grad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn(q, k, v)
            if case.needs_grad:
                out.sum().backward()
            return None
        except RuntimeError as exc:
            messages = [_TRIGGERED.sub("", str(w.message)).strip() for w in caught]
            messages = [m for m in dict.fromkeys(messages) if m]
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return "; ".join(messages) if messages else first


class FlexProvider(Provider):
    """``torch.nn.attention.flex_attention`` under ``torch.compile``; causal via a block mask.

    Compilation happens per shape (dynamic=False, as in production use where shapes are static); compiled
    graphs and block masks are cached by shape, and the compile time spent is budgeted: past the budget, new
    shapes are reported n/a so that a run with many shapes still ends on time.
    """

    name = "flex"

    def __init__(self, compile_budget_s: float | None = None):
        self.compile_budget_s = compile_budget_s
        self.compile_seconds = 0.0
        self._compiled = None
        self._masks: dict[tuple, object] = {}
        self._seen: set[tuple] = set()
        self._pending = False

    def unavailable(self) -> str | None:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
        except ImportError as exc:
            return f"torch {torch.__version__} has no FlexAttention ({exc}); needs torch>=2.5"
        return None

    @staticmethod
    def _key(case: Case) -> tuple:
        return (case.needs_grad, case.dtype, case.batch, case.heads_q, case.heads_k, case.seqlen_q, case.seqlen_k,
                case.head_dim, case.causal)  # fmt: skip

    def na_reason(self, case: Case, info: DeviceInfo) -> str | None:
        budget = self.compile_budget_s
        if budget is not None and self.compile_seconds > budget and self._key(case) not in self._seen:
            return f"compile budget of {budget:.0f} s used up ({self.compile_seconds:.0f} s spent compiling)"
        return None

    def _block_mask(self, case: Case, device: torch.device):
        from torch.nn.attention.flex_attention import create_block_mask

        key = (case.seqlen_q, case.seqlen_k, str(device))
        if key not in self._masks:
            offset = case.seqlen_k - case.seqlen_q  # bottom-right alignment, as flash-attn

            def causal_mask(b, h, q_idx, kv_idx):
                return q_idx + offset >= kv_idx

            self._masks[key] = create_block_mask(causal_mask, None, None, case.seqlen_q, case.seqlen_k, device=device)
        return self._masks[key]

    def build(self, case: Case, device: torch.device) -> Kernel:
        from torch.nn.attention.flex_attention import flex_attention

        if self._compiled is None:
            _raise_recompile_limits()
            _allow_repeated_backward()
            self._compiled = torch.compile(flex_attention, dynamic=False)
        compiled = self._compiled
        block_mask = self._block_mask(case, device) if case.causal else None
        extra = {"enable_gqa": True} if case.heads_q != case.heads_k else {}
        key = self._key(case)
        self._pending = key not in self._seen
        self._seen.add(key)

        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, **extra)
            return out.transpose(1, 2)

        return Kernel(fn, note="torch.compile(flex_attention, dynamic=False)")

    def first_run(self, seconds: float) -> None:
        if self._pending:
            self.compile_seconds += seconds
            self._pending = False


def _raise_recompile_limits() -> None:
    """Every shape is one more compile of the same function; dynamo's default limit (8) would silently fall
    back to eager FlexAttention (slow and O(S^2) memory) and corrupt the comparison."""
    import torch._dynamo.config as dynamo_config

    for name, value in (("recompile_limit", 4096), ("cache_size_limit", 4096),
                        ("accumulated_recompile_limit", 65536), ("accumulated_cache_size_limit", 65536)):  # fmt: skip
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), value))


class FlashAttnProvider(Provider):
    """flash-attn 2 (``flash_attn``) or 3 (``flash_attn_interface``, Hopper), when installed."""

    def __init__(self, module: str, name: str):
        self.module = module
        self.name = name

    def unavailable(self) -> str | None:
        if importlib.util.find_spec(self.module) is None:
            hint = "pip install flash-attn" if self.module == "flash_attn" else "build flash-attn's hopper/ package"
            return f"{self.module} is not installed ({hint})"
        if not torch.cuda.is_available():
            return "needs a CUDA device"
        return None

    def na_reason(self, case: Case, info: DeviceInfo) -> str | None:
        if info.device.type != "cuda":
            return "needs a CUDA device"
        if case.dtype not in ("fp16", "bf16"):
            return f"supports fp16/bf16 only, not {case.dtype}"
        if case.head_dim > 256 or case.head_dim % 8:
            return f"head_dim={case.head_dim} unsupported (multiples of 8 up to 256)"
        return None

    def build(self, case: Case, device: torch.device) -> Kernel:
        module = importlib.import_module(self.module)
        causal = case.causal
        if case.mode == "decode":
            kvcache = module.flash_attn_with_kvcache

            def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return _first(kvcache(q, k, v, causal=causal))

        else:
            func = module.flash_attn_func

            def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return _first(func(q, k, v, causal=causal))

        return Kernel(fn)


def _first(result):
    # flash-attn 3 returns (out, lse) from some entry points; only out is compared and timed.
    return result[0] if isinstance(result, tuple) else result


def peer_providers(compile_budget_s: float | None = None) -> list[Provider]:
    return [
        SdpaProvider("flash"),
        SdpaProvider("cudnn"),
        SdpaProvider("efficient"),
        SdpaProvider("math"),
        FlexProvider(compile_budget_s),
        FlashAttnProvider("flash_attn", "flash_attn"),
        FlashAttnProvider("flash_attn_interface", "flash_attn3"),
    ]


def _allow_repeated_backward() -> None:
    """The bwd benchmark replays one graph's backward (retain_graph=True), which compiled graphs with donated
    buffers refuse ("compiled with non-empty donated buffers", seen on torch 2.11); turn donation off."""
    try:
        import torch._functorch.config as functorch_config
    except ImportError:
        return
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
