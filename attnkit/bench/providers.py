"""Providers: the things being compared. Each turns a :class:`Case` into ``fn(q, k, v) -> out`` on
(batch, seqlen, heads, head_dim) tensors; for decode ``k``/``v`` are the KV cache.

attnkit backends are providers ``attnkit:<backend>``; the peers (PyTorch SDPA per backend, FlexAttention,
flash-attn) live in :mod:`attnkit.bench.peers`. A provider says *before* running why it cannot take a case
(``na_reason``), or raises :class:`NotApplicable` when it finds out while running; either becomes "n/a" in the
results, whereas any other exception becomes "error".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import BackendUnsupportedError, NoBackendError
from ..ops.attention import attention
from ..ops.kvcache import attention_with_kvcache
from ..registry import REGISTRY, resolve_alias
from . import peers
from .cases import Case
from .interface import AttnFn, DeviceInfo, Kernel, NotApplicable, Prepare, Provider

# Decode-only variants of an attnkit provider, named attnkit:<backend>+<variant>.
DECODE_VARIANTS = {
    "seqlens": "cache_seqlens passed as an int32 tensor (per-row lengths, as a decode loop has them)",
    "paged16": "the cache in shuffled pages of 16 tokens (block_table)",
    "paged256": "the cache in shuffled pages of 256 tokens (block_table)",
}


class AttnkitProvider(Provider):
    """An attnkit backend. Decode calls ``attention_with_kvcache`` over the whole cache, its lengths left to the
    default (known on the host); a ``variant`` (decode only, see ``DECODE_VARIANTS``) passes the lengths as a
    tensor or moves the cache into pages first (outside the timed region)."""

    kind = "attnkit"

    def __init__(self, backend: str, variant: str = ""):
        if variant and variant not in DECODE_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; known: {', '.join(DECODE_VARIANTS)}")
        self.backend = backend
        self.variant = variant
        self.name = f"attnkit:{backend}" + (f"+{variant}" if variant else "")
        if variant:
            self.modes = frozenset({"decode"})

    def unavailable(self) -> str | None:
        return REGISTRY.get(self.backend).unavailable_reason()

    def na_reason(self, case: Case, info: DeviceInfo) -> str | None:
        page = self._page_size()
        if page and case.seqlen_k % page:
            return f"KV length {case.seqlen_k} is not a multiple of the page size {page}"
        return None

    def _page_size(self) -> int:
        return int(self.variant.removeprefix("paged")) if self.variant.startswith("paged") else 0

    def build(self, case: Case, device: torch.device) -> Kernel:
        backend, causal = self.backend, case.causal
        if case.mode != "decode":

            def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return attention(q, k, v, causal=causal, backend=backend)

            return Kernel(_unsupported_as_na(fn))
        lengths = table = None
        prepare = None
        if self.variant == "seqlens":  # made once, outside the timed region
            lengths = torch.full((case.batch,), case.seqlen_k, dtype=torch.int32, device=device)
        page = self._page_size()
        if page:
            table, prepare = _paged(case, page, device)

        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attention_with_kvcache(q, k, v, cache_seqlens=lengths, block_table=table, causal=causal,
                                          backend=backend)  # fmt: skip

        note = DECODE_VARIANTS.get(self.variant, "")
        return Kernel(_unsupported_as_na(fn), prepare=prepare, note=note)


def shuffled_pages(batch: int, seqlen_k: int, page: int,
                   device: torch.device) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:  # fmt: skip
    """A block table spreading each row's ``seqlen_k // page`` pages over a shuffled page pool (the same shuffle for
    a given length), and the function that copies a contiguous (B, S, Hk, D) cache into that pool."""
    per_row = seqlen_k // page
    order = torch.randperm(batch * per_row, generator=torch.Generator().manual_seed(seqlen_k))
    table = order.view(batch, per_row).to(device=device, dtype=torch.int32)
    flat = table.flatten().long()

    def to_pool(x: torch.Tensor) -> torch.Tensor:
        pool = torch.empty(batch * per_row, page, *x.shape[2:], dtype=x.dtype, device=x.device)
        pool[flat] = x.reshape(batch * per_row, page, *x.shape[2:])
        return pool

    return table, to_pool


def _paged(case: Case, page: int, device: torch.device) -> tuple[torch.Tensor, Prepare]:
    """The case's block table over a shuffled page pool, and the (untimed) transform that copies its contiguous
    caches into that pool."""
    table, to_pool = shuffled_pages(case.batch, case.seqlen_k, page, device)

    def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return q, to_pool(k), to_pool(v)

    return table, prepare


def _unsupported_as_na(fn: AttnFn) -> AttnFn:
    """attnkit's own "this backend cannot run this call" errors mean n/a, with attnkit's reasons."""

    def wrapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        try:
            return fn(q, k, v)
        except BackendUnsupportedError as exc:
            raise NotApplicable("; ".join(exc.reasons)) from exc
        except NoBackendError as exc:
            raise NotApplicable(str(exc).splitlines()[0]) from exc

    return wrapped


def attnkit_backend_names() -> list[str]:
    return list(REGISTRY.names())


def all_providers(compile_budget_s: float | None = None) -> dict[str, Provider]:
    """Every provider attnkit knows of, available or not, by name (``compile_budget_s``: see FlexProvider)."""
    providers: dict[str, Provider] = {}
    for backend in attnkit_backend_names():
        p = AttnkitProvider(backend)
        providers[p.name] = p
    for variant in DECODE_VARIANTS:
        for backend in attnkit_backend_names():
            if "kvcache" in REGISTRY.get(backend).capabilities.ops:  # the variants measure decode only
                p = AttnkitProvider(backend, variant)
                providers[p.name] = p
    for p in peers.peer_providers(compile_budget_s):
        providers[p.name] = p
    return providers


def default_names(providers: dict[str, Provider], device: torch.device) -> list[str]:
    """What runs without ``--providers``.

    On a GPU: every available attnkit backend except ``reference`` (a correctness oracle, slow by design), each
    also with tensor lengths in decode (``+seqlens``; the paged variants only by name), and every peer present. On
    CPU: the reference backend and SDPA's math backend, on tiny sizes, so the command is testable anywhere;
    compiled peers and interpreted Triton kernels only when asked for by name.
    """
    if device.type == "cpu":
        return [n for n in ("attnkit:reference", "sdpa:math") if n in providers]
    names = []
    for name, p in providers.items():
        base, _, variant = name.partition("+")
        if base == "attnkit:reference" or variant.startswith("paged") or p.unavailable() is not None:
            continue
        names.append(name)
    return names


GROUPS = {
    "sdpa": ("sdpa:flash", "sdpa:cudnn", "sdpa:efficient", "sdpa:math"),
}


def resolve_names(requested: list[str], providers: dict[str, Provider], device: torch.device) -> list[str]:
    """Expand ``--providers`` tokens: provider names, bare attnkit backend names (``triton`` too), and the groups
    ``attnkit`` (available attnkit backends), ``sdpa``, ``peers``, ``default`` and ``all``."""
    names: list[str] = []

    def add(name: str) -> None:
        if name not in names:
            names.append(name)

    for token in requested:
        token = token.strip()
        if not token:
            continue
        if token == "all":
            for n in providers:
                add(n)
        elif token == "default":
            for n in default_names(providers, device):
                add(n)
        elif token == "attnkit":
            for n, p in providers.items():
                oracle_on_gpu = n.partition("+")[0] == "attnkit:reference" and device.type != "cpu"
                if p.kind == "attnkit" and p.unavailable() is None and not oracle_on_gpu:
                    add(n)
        elif token == "peers":
            for n, p in providers.items():
                if p.kind == "peer" and p.unavailable() is None:
                    add(n)
        elif token in GROUPS:
            for n in GROUPS[token]:
                add(n)
        elif token in providers:
            add(token)
        elif _attnkit_name(token) in providers:
            add(_attnkit_name(token))
        else:
            known = ", ".join([*providers, "attnkit", "sdpa", "peers", "default", "all"])
            raise ValueError(f"unknown provider {token!r}; known: {known}")
    return names


def _attnkit_name(token: str) -> str:
    """``triton``, ``attnkit:triton``, ``triton+seqlens`` -> the provider name with the backend alias resolved."""
    base, plus, variant = token.removeprefix("attnkit:").partition("+")
    return f"attnkit:{resolve_alias(base)}{plus}{variant}"
