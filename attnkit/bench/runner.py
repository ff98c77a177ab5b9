"""The benchmark loop: for each case, make rotated random inputs; for each provider, decide applicability, check
correctness on those inputs and measure peak memory; then time all providers of the case together, one call of
each per round. Nothing a provider does stops the run: every outcome
is a :class:`Record` with a status of ``ok``, ``n/a``, ``WRONG`` or ``error``.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .cases import MEMORY_TARGET, Case, case_flops, input_bytes, kv_bytes, memory_budget
from .correctness import verify
from .decode import Capture, measure_decode
from .interface import AttnFn, DeviceInfo, Kernel, NotApplicable, Provider
from .progress import PlainProgress, Progress
from .timing import Clock, Timing, clock_for, l2_cache_bytes, measure_interleaved, rotation_count

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]

# Rotated input sets together span this many L2 caches, so no call finds its inputs left in L2 by the last one.
L2_MULTIPLE = 4


@dataclass
class Record:
    case: Case
    provider: str
    status: str  # "ok", "n/a", "WRONG", "error"
    reason: str = ""
    note: str = ""
    ms: float | None = None  # decode: eager wall time per call (host included), see attnkit/bench/decode.py
    min_ms: float | None = None
    repeats: int = 0
    rotations: int = 0
    tflops: float | None = None
    gbps: float | None = None
    # Decode only: CUDA-graph replays (GPU time), or why there is no such number.
    graph_ms: float | None = None
    graph_gbps: float | None = None
    graph_reason: str = ""
    peak_mib: float | None = None
    # Training cases with a measured peak: the memory target's budget (cases.MemoryBudget), the part of it
    # allocated before the measurement (q, k, v, dout; not in peak_mib), and (inputs + peak) / budget.
    budget_mib: float | None = None
    inputs_mib: float | None = None
    budget_ratio: float | None = None
    errors: dict[str, float] = field(default_factory=dict)
    allowed: dict[str, float] = field(default_factory=dict)
    check_scope: str = ""

    @property
    def value(self) -> float | None:
        """The headline number of this record's mode: GB/s for decode, MiB for memory, else TFLOP/s."""
        if self.case.mode == "decode":
            return self.gbps
        if self.case.mode == "memory":
            return self.peak_mib
        return self.tflops

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.update(d.pop("case"))
        return d


@dataclass
class BenchConfig:
    cases: Sequence[Case]
    providers: dict[str, Provider]  # name -> provider, in column order
    device: torch.device
    case_time_s: float = 0.2  # timing budget per (case, provider), warm-up excluded
    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 100
    time_budget_s: float | None = None  # stop starting new cases past this
    seed: int = 0
    # Decode graph timing; None: CUDA graphs and CUDA events on a CUDA device (tests inject stand-ins).
    graph_capture: Capture | None = None
    graph_clock: Clock | None = None


@dataclass
class BenchResult:
    records: list[Record]
    notes: list[str]
    cases_total: int
    cases_run: int
    seconds: float


def make_inputs(case: Case, device: torch.device, sets: int, seed: int) -> list[Inputs]:
    """``sets`` independent sets of standard-normal inputs (never zeros, which some kernels short-cut)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = case.torch_dtype

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    out = []
    for _ in range(sets):
        q = rnd(case.batch, case.seqlen_q, case.heads_q, case.head_dim)
        k = rnd(case.batch, case.seqlen_k, case.heads_k, case.head_dim)
        v = rnd(case.batch, case.seqlen_k, case.heads_k, case.head_dim)
        dout = rnd(case.batch, case.seqlen_q, case.heads_q, case.head_dim) if case.needs_grad else None
        out.append((q, k, v, dout))
    return out


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory the caching allocator holds but does not use is free for our purposes too.
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(fn: AttnFn, case: Case, sets: list[Inputs]) -> Callable[[int], object]:
    """The timed call on input set ``i``: forward, backward only (graphs built beforehand), or both."""
    if not case.needs_grad:

        def forward(i: int) -> object:
            q, k, v, _ = sets[i]
            with torch.no_grad():
                return fn(q, k, v)

        return forward
    leaves = [[t.detach().requires_grad_() for t in s[:3]] for s in sets]
    if case.mode == "bwd":
        with torch.enable_grad():
            outs = [fn(*ls) for ls in leaves]  # forward passes stay outside the timed region

        def backward(i: int) -> object:
            return torch.autograd.grad(outs[i], leaves[i], sets[i][3], retain_graph=True)

        return backward

    def forward_backward(i: int) -> object:
        with torch.enable_grad():
            return torch.autograd.grad(fn(*leaves[i]), leaves[i], sets[i][3])

    return forward_backward


def peak_memory_mib(fn: AttnFn, case: Case, inputs: Inputs, device: torch.device) -> float | None:
    """Peak memory allocated by one forward (plus backward when training) beyond what was allocated before,
    i.e. beyond the inputs (q, k, v, dout); it includes the output, the lse and other saved tensors, the
    gradients and any workspace. One-time allocations (cuBLAS workspaces, autotuning) were made by the
    correctness check that ran first. CUDA only: the CPU allocator keeps no peak."""
    if device.type != "cuda":
        return None
    step = make_step(fn, replace(case, mode="fwdbwd") if case.needs_grad else case, [inputs])
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = step(0)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak / 2**20


def as_case_sees_it(kernel: Kernel) -> AttnFn:
    """``kernel.fn`` behind ``kernel.prepare``: a function of the case's own inputs, which is what
    :func:`verify` must judge. Its float64 reference pairs query head h with KV head h // (Hq // Hk) of the
    case's K/V; given K/V already repeated per query head by ``prepare``, that index picks the wrong head (the
    sdpa:efficient decode cells read WRONG for this reason). Gradients flow back through ``prepare`` too, so dk
    and dv come out with the case's KV heads."""
    if kernel.prepare is None:
        return kernel.fn
    fn, prepare = kernel.fn, kernel.prepare

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fn(*prepare(q, k, v))

    return call


def _message(exc: BaseException) -> str:
    """The exception's first line and where it was raised, short enough for a table footnote."""
    text = str(exc).strip().splitlines()
    first = text[0][:240] if text else ""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {first}{where}"


def prepare_provider(
    provider: Provider, case: Case, sets: list[Inputs], config: BenchConfig, info: DeviceInfo
) -> tuple[Record, Callable[[int], object] | None]:
    """Applicability, correctness on the case's inputs and peak memory; returns the record and, when the
    provider is to be timed, its timed step (see :func:`make_step`), else None."""
    record = Record(case, provider.name, "ok", rotations=len(sets))
    reason = provider.unavailable() or provider.na_reason(case, info)
    if reason:
        record.status, record.reason = "n/a", reason
        return record, None
    try:
        kernel = provider.build(case, config.device)
        record.note = kernel.note
        start = time.perf_counter()
        try:
            verdict = verify(as_case_sees_it(kernel), *sets[0], case, seed=config.seed)
            _synchronize(config.device)
        finally:
            # Charged even when the first call fails: a compile that errors out took its time too.
            provider.first_run(time.perf_counter() - start)
        record.errors, record.allowed, record.check_scope = verdict.errors, verdict.allowed, verdict.scope
        if not verdict.ok:
            record.status, record.reason = "WRONG", verdict.summary()
            return record, None
        # Measured from the case's inputs, so a provider's input transform (K/V repeated for a backend without
        # a GQA kernel) counts as the extra memory it is.
        record.peak_mib = peak_memory_mib(as_case_sees_it(kernel), case, sets[0], config.device)
        _fill_budget(record)
        if case.mode == "memory":
            return record, None
        prepared = [(*kernel.prepare(*s[:3]), s[3]) for s in sets] if kernel.prepare else sets
        return record, make_step(kernel.fn, case, prepared)
    except Exception as exc:
        _record_failure(record, exc)
        return record, None


def time_providers(prepared: list[tuple[Record, Callable[[int], object]]], rotations: int, config: BenchConfig) -> None:
    """Time the prepared providers of one case in rounds (:func:`timing.measure_interleaved`), filling their
    records; decode cases eagerly and as CUDA-graph replays (:func:`decode.measure_decode`)."""
    steps = {str(i): step for i, (_, step) in enumerate(prepared)}
    if prepared and prepared[0][0].case.mode == "decode":
        _time_decode(prepared, steps, rotations, config)
        return
    try:
        timings = measure_interleaved(steps, rotations, clock_for(config.device), warmup=config.warmup,
                                      min_repeats=config.min_repeats, max_repeats=config.max_repeats,
                                      budget_s=config.case_time_s)  # fmt: skip
    except Exception as exc:  # raised outside any one provider's call: a sticky CUDA error, say
        timings = dict.fromkeys(steps, exc)
    for key, (record, _) in zip(steps, prepared):
        timing = timings[key]
        if isinstance(timing, Exception):
            _record_failure(record, timing)
        else:
            _fill_rates(record, timing)


def _time_decode(prepared, steps, rotations: int, config: BenchConfig) -> None:
    try:
        timings = measure_decode(steps, rotations, config.device, warmup=config.warmup,
                                 min_repeats=config.min_repeats, max_repeats=config.max_repeats,
                                 budget_s=config.case_time_s, capture=config.graph_capture,
                                 graph_clock=config.graph_clock)  # fmt: skip
    except Exception as exc:  # outside any one provider's call: a sticky CUDA error, say
        for record, _ in prepared:
            _record_failure(record, exc)
        return
    for key, (record, _) in zip(steps, prepared):
        timing = timings[key]
        if isinstance(timing.eager, Exception):
            _record_failure(record, timing.eager)
            continue
        _fill_rates(record, timing.eager)
        if isinstance(timing.graph, Timing):
            record.graph_ms = timing.graph.median_ms
            record.graph_gbps = kv_bytes(record.case) / (timing.graph.median_ms * 1e-3) / 1e9
        elif isinstance(timing.graph, Exception):
            record.graph_reason = f"replay failed: {_message(timing.graph)}"
        else:
            record.graph_reason = timing.graph


def _record_failure(record: Record, exc: Exception) -> None:
    if isinstance(exc, NotApplicable):
        record.status, record.reason = "n/a", str(exc)
    elif isinstance(exc, torch.cuda.OutOfMemoryError):
        record.status, record.reason = "error", f"out of memory: {_message(exc)}"
    else:
        record.status, record.reason = "error", _message(exc)


def _release(device: torch.device) -> None:
    """Give cached blocks back so the next case's free-memory estimate is true. After a kernel fault CUDA calls
    raise; that error resurfaces on the next real call, where it is reported, so it is not raised from here."""
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:
            pass


def _fill_budget(record: Record) -> None:
    """Set the memory target's numbers where they mean something: a training case with a measured peak."""
    if record.peak_mib is None or not record.case.needs_grad:
        return
    budget = memory_budget(record.case)
    record.budget_mib = budget.total / 2**20
    record.inputs_mib = budget.before / 2**20
    record.budget_ratio = budget.ratio(record.peak_mib * 2**20)


def within_target(record: Record) -> bool | None:
    """Whether the record's peak meets the memory target (None where there is no ratio)."""
    return None if record.budget_ratio is None else record.budget_ratio <= MEMORY_TARGET


def _fill_rates(record: Record, timing: Timing) -> None:
    case = record.case
    record.ms, record.min_ms, record.repeats, record.rotations = (
        timing.median_ms, timing.min_ms, timing.repeats, timing.rotations,
    )  # fmt: skip
    seconds = timing.median_ms * 1e-3
    record.tflops = case_flops(case) / seconds / 1e12
    if case.mode == "decode":
        record.gbps = kv_bytes(case) / seconds / 1e9


def _rotations(case: Case, device: torch.device) -> int:
    if case.mode == "memory":
        return 1
    return rotation_count(input_bytes(case), L2_MULTIPLE * l2_cache_bytes(device))


def run_bench(
    config: BenchConfig,
    progress: Progress | None = None,
    on_case_done: Callable[[list[Record], list[str]], None] | None = None,
) -> BenchResult:
    """Run every case with every provider; ``on_case_done`` sees the records so far (to save partial results)."""
    progress = progress or PlainProgress()
    cases = list(config.cases)
    records: list[Record] = []
    notes: list[str] = []
    start = time.perf_counter()
    capability = torch.cuda.get_device_capability(config.device) if config.device.type == "cuda" else None
    progress.start(sum(len(_providers_for(case, config)) for case in cases))
    done = 0
    for index, case in enumerate(cases):
        elapsed = time.perf_counter() - start
        if config.time_budget_s is not None and elapsed > config.time_budget_s:
            left = cases[index:]
            modes = ", ".join(f"{m}: {sum(c.mode == m for c in left)}" for m in dict.fromkeys(c.mode for c in left))
            notes.append(f"time budget of {config.time_budget_s:.0f} s exceeded after {elapsed:.0f} s: "
                         f"{len(left)} of {len(cases)} cases not run ({modes})")  # fmt: skip
            progress.log(f"NOTE: {notes[-1]}")
            break
        sets: list[Inputs] = []
        try:
            sets = make_inputs(case, config.device, _rotations(case, config.device), config.seed + index)
            info = DeviceInfo(config.device, free_bytes(config.device), capability, len(sets))
            # Every provider is checked first, then all are timed together, in rounds (see measure_interleaved).
            case_records, to_time = [], []
            for provider in _providers_for(case, config).values():
                record, step = prepare_provider(provider, case, sets, config, info)
                case_records.append(record)
                if step is None:
                    progress.advance(_describe(record))
                else:
                    to_time.append((record, step))
            if to_time:
                time_providers(to_time, len(sets), config)
                for record, _ in to_time:
                    progress.advance(_describe(record))
            records.extend(case_records)
            del to_time
        except KeyboardInterrupt:
            # A wall-clock limit (timeout --signal=INT) or Ctrl-C: keep what was measured, write it, stop.
            notes.append(f"interrupted after {time.perf_counter() - start:.0f} s during {case.label()}: "
                         f"{len(cases) - index} of {len(cases)} cases not (fully) run")  # fmt: skip
            progress.log(f"NOTE: {notes[-1]}")
            break
        except torch.cuda.OutOfMemoryError as exc:
            # Inputs that do not fit: every provider of this case records it, and the run goes on.
            recorded = {r.provider for r in records if r.case == case}
            for name in _providers_for(case, config):
                if name not in recorded:
                    records.append(Record(case, name, "error", reason=f"inputs: out of memory: {_message(exc)}"))
                    progress.advance(_describe(records[-1]))
        except Exception as exc:
            # Outside any provider: typically a CUDA error left sticky by a faulting kernel, after which every
            # call fails. Stop here; what was measured is kept.
            notes.append(f"stopped during {case.label()}: {_message(exc)}")
            progress.log(f"NOTE: {notes[-1]}")
            break
        finally:
            del sets
            _release(config.device)
        done += 1
        if on_case_done is not None:
            on_case_done(records, notes)
    progress.close()
    return BenchResult(records, notes, len(cases), done, time.perf_counter() - start)


def _providers_for(case: Case, config: BenchConfig) -> dict[str, Provider]:
    """The providers that measure this case's mode at all (a decode-only variant has no fwd record)."""
    return {n: p for n, p in config.providers.items() if p.modes is None or case.mode in p.modes}


def _describe(record: Record) -> str:
    what = f"{record.case.label()} {record.provider}"
    if record.status != "ok":
        return f"{what}: {record.status} {record.reason}".rstrip()
    if record.case.mode == "memory":
        if record.peak_mib is None:
            return f"{what}: peak n/a on this device"
        verdict = "pass" if within_target(record) else "fail"
        ratio = f"(inputs {record.inputs_mib:.1f} + peak) / budget {record.budget_mib:.1f} MiB"
        return f"{what}: peak extra {record.peak_mib:.1f} MiB; {ratio} = {record.budget_ratio:.3f}x, {verdict}"
    rate = f"{record.gbps:.1f} GB/s" if record.gbps is not None else f"{record.tflops:.2f} TFLOP/s"
    if record.case.mode != "decode":
        return f"{what}: {record.ms:.3f} ms, {rate}"
    graph = (f"graph {record.graph_ms:.3f} ms, {record.graph_gbps:.1f} GB/s" if record.graph_ms is not None
             else f"graph: {record.graph_reason}")  # fmt: skip
    return f"{what}: eager {record.ms:.3f} ms, {rate}; {graph}"
