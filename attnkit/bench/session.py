"""One benchmark run end to end: providers, the loop, results written after every case (so a run killed by a
time limit still leaves complete files), and the figures at the end."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import meta as meta_mod
from .cases import Case
from .progress import PlainProgress, make_progress
from .providers import all_providers, resolve_names
from .report import markdown, to_json, write_csv, write_json
from .runner import BenchConfig, BenchResult, Record, run_bench


@dataclass
class Options:
    out_dir: Path
    device: torch.device
    providers: Sequence[str] = ("default",)  # --providers tokens
    plots: bool = True
    separate_plots: bool = False
    time_budget_s: float | None = None
    case_time_s: float = 0.2
    compile_budget_s: float | None = None
    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 100
    progress: str = "auto"
    log_path: Path | None = None  # per-run lines go here instead of stdout (long runs, captured output)
    seed: int = 0
    extra_config: dict[str, object] = field(default_factory=dict)


def write_outputs(out_dir: Path, records: list[Record], meta: dict, config: dict, notes: list[str],
                  providers: dict, order: Sequence[str]) -> None:  # fmt: skip
    write_json(out_dir / "results.json", to_json(records, meta, config, notes, providers))
    write_csv(out_dir / "results.csv", records)
    (out_dir / "results.md").write_text(markdown(records, meta, notes, order))


def make_plots(out_dir: Path, records: list[Record], order: Sequence[str], gpu: str | None,
               separate: bool) -> tuple[list[Path], str | None]:  # fmt: skip
    """Figures, or the reason there are none (matplotlib missing, or a plotting error that must not lose the
    results already written)."""
    from .plots import plot_results

    try:
        return plot_results(records, out_dir, order, gpu=gpu, separate=separate), None
    except ImportError as exc:
        return [], str(exc)
    except Exception as exc:
        return [], f"plotting failed: {type(exc).__name__}: {exc}"


def run(cases: Sequence[Case], options: Options) -> BenchResult:
    known = all_providers(options.compile_budget_s)
    names = resolve_names(list(options.providers), known, options.device)
    if not names:
        raise ValueError("no providers to run; see --list-providers")
    providers = {n: known[n] for n in names}
    options.out_dir.mkdir(parents=True, exist_ok=True)
    meta = meta_mod.collect(options.device)
    provider_info = {n: {"kind": p.kind, "unavailable": p.unavailable()} for n, p in providers.items()}
    config = {
        "providers": names,
        "modes": list(dict.fromkeys(c.mode for c in cases)),
        "cases": len(cases),
        "time_budget_s": options.time_budget_s,
        "case_time_s": options.case_time_s,
        "compile_budget_s": options.compile_budget_s,
        "warmup": options.warmup,
        "repeats": [options.min_repeats, options.max_repeats],
        "timer": "cuda events" if options.device.type == "cuda" else "time.perf_counter",
        "timing": "providers of a case interleaved, one call each per round",
        **options.extra_config,
    }
    log = open(options.log_path, "w", buffering=1) if options.log_path else None
    progress = PlainProgress(log) if log else make_progress(options.progress)
    progress.log(f"attnkit bench: {len(cases)} cases x {len(names)} providers on {meta.get('gpu') or meta['device']}")
    for n, info in provider_info.items():
        if info["unavailable"]:
            progress.log(f"  {n}: unavailable ({info['unavailable']}); its cells will read n/a")

    def save(records: list[Record], notes: list[str]) -> None:
        write_outputs(options.out_dir, records, meta, config, notes, provider_info, names)

    bench_config = BenchConfig(cases, providers, options.device, case_time_s=options.case_time_s,
                               warmup=options.warmup, min_repeats=options.min_repeats,
                               max_repeats=options.max_repeats, time_budget_s=options.time_budget_s,
                               seed=options.seed)  # fmt: skip
    try:
        result = run_bench(bench_config, progress, on_case_done=save)
    finally:
        if log:
            log.close()
    config["seconds"] = round(result.seconds, 1)
    config["cases_run"] = result.cases_run
    if options.plots:
        files, why_not = make_plots(options.out_dir, result.records, names, meta.get("gpu"), options.separate_plots)
        if why_not:
            result.notes.append(f"no plots: {why_not}")
        else:
            config["plots"] = [f.name for f in files]
    save(result.records, result.notes)
    return result


def summary(result: BenchResult, out_dir: Path) -> str:
    lines = [f"{result.cases_run} of {result.cases_total} cases in {result.seconds:.0f} s; results in {out_dir}:"]
    lines += [f"  {p.name}" for p in sorted(out_dir.iterdir()) if p.suffix in (".json", ".csv", ".md", ".png")]
    wrong = [r for r in result.records if r.status == "WRONG"]
    errors = [r for r in result.records if r.status == "error"]
    for r in wrong:
        lines.append(f"WRONG: {r.provider} on {r.case.label()}: {r.reason}")
    if errors:
        lines.append(f"{len(errors)} runs raised errors (see results.md)")
    lines += [f"NOTE: {n}" for n in result.notes]
    return "\n".join(lines)
