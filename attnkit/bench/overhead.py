"""``attnkit bench --mode overhead``: wall time per eager call at tiny sizes, attnkit beside PyTorch SDPA.

At these sizes a GPU finishes each kernel in a few microseconds, so the time per call is what the host spends
launching it: validation, dispatch, the custom op, autograd and the kernel launch. Each case times, in the same
run and in rounds (every provider once per round, the starting provider rotating), batches of back-to-back eager
calls: ``wall`` is a batch's time up to and including the final device synchronisation divided by the calls,
``host`` the same without waiting for the device; the report gives medians over the rounds.

Providers per case: attnkit with each backend ``auto`` could run it on, ``attnkit:frontend`` (a backend that
returns preallocated outputs: attnkit's own cost per call without any kernel), and SDPA on the same problem
(decode: an in-place append into the cache plus SDPA over its valid prefix; varlen: SDPA over the padded batch).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit
from attnkit.registry import REGISTRY, Backend, BackendCapabilities
from attnkit.spec import FEATURES, OPS, device_capability, is_hip

from . import meta as meta_mod

FRONTEND = "attnkit:frontend"
SDPA = "sdpa"
_FRONTEND_BACKEND = "bench_frontend"
MIN_CALLS = 3  # per provider and round


@dataclass(frozen=True)
class OverheadCase:
    name: str
    description: str


CASES = (
    OverheadCase("attention", "attention fwd, B=1 S=128 H=8 D=64 causal"),
    OverheadCase("attention_train", "attention fwd+bwd, B=1 S=128 H=8 D=64 causal"),
    OverheadCase("varlen", "attention_varlen fwd, 2 sequences of 64, H=8 D=64 causal"),
    OverheadCase("kvcache_int", "attention_with_kvcache decode + append, B=1 Hq/Hk=32/8 D=128, 1k cache, int lens"),
    OverheadCase("kvcache_tensor", "same decode step, cache_seqlens as an int32 tensor"),
)


@dataclass
class Row:
    case: str
    provider: str
    wall_us: float | None = None
    host_us: float | None = None
    calls_per_round: int = 0
    rounds: int = 0
    error: str | None = None
    vs_sdpa: float | None = None


@dataclass
class OverheadResult:
    rows: list[Row] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


class _FrontendOnly(Backend):
    """Eligible for everything, computes nothing: outputs come from a per-shape cache of preallocated tensors."""

    name = _FRONTEND_BACKEND
    priority = -100
    description = "attnkit bench: no kernel (measures attnkit's per-call cost)"
    capabilities = BackendCapabilities(
        device_types=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        ops=frozenset(OPS),
        features=frozenset(FEATURES),
    )

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _outputs(self, key: tuple, make: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = make()
        return found

    def forward(self, q, k, v, alibi_slopes, params, varlen):
        def make():
            lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if varlen is None else (q.shape[1], q.shape[0])
            return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(lse_shape, dtype=torch.float32)

        return self._outputs(("fwd", q.shape, v.shape, q.dtype, q.device, varlen is None), make)

    def backward(self, dout, q, k, v, out, lse, alibi_slopes, params, varlen):
        return self._outputs(("bwd", q.shape, k.shape, v.shape, q.dtype, q.device),
                             lambda: (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)))  # fmt: skip

    def forward_kvcache(self, q, k_cache, v_cache, cache, alibi_slopes, params):
        def make():
            out = q.new_empty((*q.shape[:-1], v_cache.shape[-1]))
            return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)

        return self._outputs(("kv", q.shape, v_cache.shape, q.dtype, q.device), make)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sdpa_gqa_kwargs() -> dict[str, bool]:
    """``enable_gqa=True`` where SDPA has it (torch >= 2.5), else nothing (the caller repeats K/V)."""
    q, kv = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except TypeError:
        return {}
    return {"enable_gqa": True}


def _calls(case: str, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """The providers of one case as zero-argument callables (inputs made once, outside the timing)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, grad=False):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).requires_grad_(grad)

    backends = _attnkit_backends(case, device, dtype)
    calls: dict[str, Callable[[], object]] = {}
    if case in ("attention", "attention_train"):
        train = case == "attention_train"
        q, k, v = (rnd(1, 128, 8, 64, grad=train) for _ in range(3))
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(train) for x in (q, k, v))
        dout = rnd(1, 128, 8, 64)
        for name in (*backends, _FRONTEND_BACKEND):

            def run(name=name):
                out = attnkit.attention(q, k, v, causal=True, backend=name)
                if train:
                    out.backward(dout)

            calls[_label(name)] = run

        dout_t = dout.transpose(1, 2)

        def sdpa():
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            if train:
                out.backward(dout_t)

        calls[SDPA] = sdpa
    elif case == "varlen":
        q, k, v = (rnd(128, 8, 64) for _ in range(3))
        cu = torch.tensor([0, 64, 128], dtype=torch.int32, device=device)
        for name in (*backends, _FRONTEND_BACKEND):
            calls[_label(name)] = lambda name=name: attnkit.attention_varlen(
                q, k, v, cu, cu, 64, 64, causal=True, backend=name
            )
        qt, kt, vt = (x.view(2, 64, 8, 64).transpose(1, 2) for x in (q, k, v))
        calls[SDPA] = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    else:
        length, capacity = 1000, 1024
        k_cache, v_cache = rnd(1, capacity, 8, 128), rnd(1, capacity, 8, 128)
        q, k_new, v_new = rnd(1, 1, 32, 128), rnd(1, 1, 8, 128), rnd(1, 1, 8, 128)
        lens = length if case == "kvcache_int" else torch.tensor([length], dtype=torch.int32, device=device)
        for name in (*backends, _FRONTEND_BACKEND):
            calls[_label(name)] = lambda name=name: attnkit.attention_with_kvcache(
                q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True, backend=name
            )
        kc, vc = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # (B, Hk, S, D) views of the same cache
        qt, kt_new, vt_new = q.transpose(1, 2), k_new.transpose(1, 2), v_new.transpose(1, 2)
        gqa = _sdpa_gqa_kwargs()
        rep = 1 if gqa else 32 // 8

        def sdpa_decode():
            kc[:, :, length : length + 1] = kt_new
            vc[:, :, length : length + 1] = vt_new
            keys, values = kc[:, :, : length + 1], vc[:, :, : length + 1]
            if rep > 1:
                keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
            return F.scaled_dot_product_attention(qt, keys, values, **gqa)

        calls[SDPA] = sdpa_decode
    return calls


def _label(backend: str) -> str:
    return FRONTEND if backend == _FRONTEND_BACKEND else f"attnkit:{backend}"


def _attnkit_backends(case: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends the automatic choice could run this case on, its choice first (so not the Triton interpreter on a
    CPU, which is for tests)."""
    op = {"attention": "attention", "attention_train": "attention", "varlen": "varlen"}.get(case, "kvcache")
    hq, hk, d = (32, 8, 128) if op == "kvcache" else (8, 8, 64)
    spec = attnkit.AttentionSpec(
        op=op, device_type=device.type, compute_capability=device_capability(device),
        is_hip=is_hip() and device.type == "cuda", dtype=dtype, head_dim=d, head_dim_v=d,
        num_heads_q=hq, num_heads_k=hk, batch=1 if op != "varlen" else 2, seqlen_q=128 if op != "kvcache" else 1,
        seqlen_k=128 if op != "kvcache" else 1024, features=frozenset({"causal"} | ({"gqa"} if hq != hk else set())),
        requires_grad=case == "attention_train",
    )  # fmt: skip
    chosen = attnkit.select_backend(spec).name
    others = [
        b.name
        for b in REGISTRY.backends()
        if b.name not in (chosen, _FRONTEND_BACKEND) and not b.why_not(spec) and not b.why_not_auto(spec)
    ]
    return [chosen, *sorted(others)]


def _time_round(fn: Callable[[], object], calls: int, device: torch.device) -> tuple[float, float]:
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter()
    _sync(device)
    end = time.perf_counter()
    return (host - start) / calls * 1e6, (end - start) / calls * 1e6


def measure_case(case: str, device: torch.device, dtype: torch.dtype, seconds: float, rounds: int,
                 log: Callable[[str], None] = print) -> list[Row]:  # fmt: skip
    calls = _calls(case, device, dtype)
    rows = {name: Row(case, name) for name in calls}
    live: dict[str, Callable[[], object]] = {}
    per_call: dict[str, float] = {}
    budget = seconds / max(1, rounds) / max(1, len(calls))  # per provider and round
    for name, fn in calls.items():
        try:
            for _ in range(3):  # warm-up: kernel compilation, plans, dispatch caches
                fn()
            _sync(device)
            start, done = time.perf_counter(), 0
            while done < 20 and (done < 2 or time.perf_counter() - start < budget):
                fn()
                done += 1
            _sync(device)
            per_call[name] = (time.perf_counter() - start) / done
            live[name] = fn
        except Exception as exc:
            rows[name].error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            log(f"  {case} {name}: {rows[name].error}")
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in live}
    counts = {name: max(MIN_CALLS, int(budget / max(per_call[name], 1e-7))) for name in live}
    names = list(live)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one provider's batch would bias that provider alone
    try:
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                samples[name].append(_time_round(live[name], counts[name], device))
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    for name, got in samples.items():
        row = rows[name]
        row.host_us = statistics.median(h for h, _ in got)
        row.wall_us = statistics.median(w for _, w in got)
        row.calls_per_round, row.rounds = counts[name], len(got)
    sdpa = rows[SDPA].wall_us if SDPA in rows else None
    for row in rows.values():
        if row.wall_us is not None and sdpa:
            row.vs_sdpa = row.wall_us / sdpa
    return list(rows.values())


def run(device: torch.device, dtype: torch.dtype, *, seconds: float, rounds: int, out_dir: Path | None,
        cases: tuple[str, ...] | None = None, log: Callable[[str], None] = print) -> OverheadResult:  # fmt: skip
    names = cases or tuple(c.name for c in CASES)
    known = {c.name for c in CASES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown overhead case(s) {unknown}; choose from {sorted(known)}")
    result = OverheadResult(
        meta=meta_mod.collect(device),
        config={"dtype": str(dtype).removeprefix("torch."), "seconds_per_case": seconds, "rounds": rounds,
                "timer": "time.perf_counter around batches of back-to-back eager calls, medians over rounds",
                "cases": {c.name: c.description for c in CASES if c.name in names}},
    )  # fmt: skip
    attnkit.register_backend(_FRONTEND_BACKEND, _FrontendOnly)
    try:
        for name in names:
            log(f"overhead: {name} ...")
            result.rows += measure_case(name, device, dtype, seconds, rounds, log)
    finally:
        REGISTRY.unregister(_FRONTEND_BACKEND)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        document = {"meta": result.meta, "config": result.config, "rows": [asdict(r) for r in result.rows]}
        (out_dir / "overhead.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
        (out_dir / "overhead.md").write_text(markdown(result) + "\n")
    return result


def markdown(result: OverheadResult) -> str:
    meta = result.meta
    where = meta.get("gpu") or meta.get("device")
    lines = [
        f"# attnkit per-call overhead on {where} ({result.config.get('dtype')})",
        "",
        f"torch {meta.get('torch')}, attnkit {meta.get('attnkit_commit') or meta.get('attnkit')}. "
        "Medians over rounds of back-to-back eager calls; wall includes waiting for the device at the end of each "
        "batch, host does not. Lower is better.",
        "",
        "| case | provider | wall us/call | host us/call | wall vs SDPA |",
        "|---|---|---:|---:|---:|",
    ]
    for row in result.rows:
        if row.error:
            lines.append(f"| {row.case} | {row.provider} | error: {row.error} | | |")
            continue
        ratio = f"{row.vs_sdpa:.2f}x" if row.vs_sdpa is not None else "-"
        lines.append(f"| {row.case} | {row.provider} | {row.wall_us:.1f} | {row.host_us:.1f} | {ratio} |")
    lines += ["", *(f"- {c}: {d}" for c, d in result.config.get("cases", {}).items())]
    return "\n".join(lines)
