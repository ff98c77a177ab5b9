"""Results on disk: JSON (everything, reloadable), CSV (one row per case and provider), Markdown (tables with
providers as columns, one table per mode / dtype / head dim / causal)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from .cases import MEMORY_TARGET, Case, case_flops, kv_bytes, memory_budget
from .runner import Record, within_target

UNITS = {
    "decode": "GB/s of K/V read, eager (wall time per call) and CUDA graph (replays)",
    "memory": "peak extra MiB, forward+backward (lower is better)",
}
DECODE_LEGEND = (
    "eager: wall-clock time per call of back-to-back calls, host overhead included (a Python decode loop); "
    "graph: the same step captured in a CUDA graph, replays timed on the GPU (a loop under torch.cuda.graph). "
    "`attnkit:<backend>` leaves the cache lengths to the default (known on the host); `+seqlens` passes them "
    "as an int32 cache_seqlens tensor; `+paged16`/`+paged256` read the cache from shuffled pages."
)
DEFAULT_UNIT = "TFLOP/s (higher is better)"

CSV_FIELDS = [
    "mode", "dtype", "batch", "heads_q", "heads_k", "seqlen_q", "seqlen_k", "head_dim", "causal", "provider",
    "status", "ms", "min_ms", "tflops", "gbps", "graph_ms", "graph_gbps", "graph_reason", "peak_mib", "inputs_mib",
    "budget_mib", "budget_ratio", "flops",
    "kv_bytes", "repeats", "rotations",
    "max_error", "allowed_error", "check_scope", "reason", "note",
]  # fmt: skip


def _clean(value: object) -> object:
    """JSON has no NaN/inf; a NaN error (a provider returning NaNs) is stored as a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def to_json(records: Sequence[Record], meta: dict, config: dict, notes: Sequence[str], providers: dict) -> dict:
    return {
        "meta": meta,
        "config": config,
        "providers": providers,
        "notes": list(notes),
        "results": [_clean(r.as_dict()) for r in records],
    }


def write_json(path: Path, document: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)  # a run killed mid-write still leaves the previous complete file


def load_json(path: Path) -> tuple[list[Record], dict]:
    document = json.loads(Path(path).read_text())
    case_fields = set(Case.__dataclass_fields__)
    record_fields = set(Record.__dataclass_fields__) - {"case"}
    records = []
    for row in document["results"]:
        case = Case(**{k: v for k, v in row.items() if k in case_fields})
        records.append(Record(case=case, **{k: v for k, v in row.items() if k in record_fields}))
    return records, document


def write_csv(path: Path, records: Sequence[Record]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in records:
            row = {k: v for k, v in r.as_dict().items() if k in CSV_FIELDS}
            row["flops"] = case_flops(r.case)
            row["kv_bytes"] = kv_bytes(r.case)
            row["max_error"] = ";".join(f"{k}={v:.3g}" for k, v in r.errors.items())
            row["allowed_error"] = ";".join(f"{k}={v:.3g}" for k, v in r.allowed.items())
            writer.writerow(row)


MEMORY_LEGEND = (
    "Peak extra: memory allocated during one forward+backward beyond what was allocated before it, i.e. out, "
    "lse and other saved tensors, dq, dk, dv and any workspace (q, k, v and dout exist before and are not in "
    "it). Budget: the bytes of q, k, v, out, dout, dq, dk, dv and the float32 lse. In brackets: "
    "(inputs + peak extra) / budget, both sides counting the same tensors, and whether it meets the O(seqlen) "
    f"target of {MEMORY_TARGET:.2f}x (pass) or not (fail)."
)


def _memory_cell(record: Record, text: str) -> str:
    if record.budget_ratio is None:
        return text
    return f"{text} ({record.budget_ratio:.2f}x, {'pass' if within_target(record) else 'fail'})"


def _memory_columns(case: Case) -> list[str]:
    budget = memory_budget(case)
    return [_fmt(budget.before / 2**20), _fmt(budget.total / 2**20)]


def _fmt(value: float) -> str:
    # Three significant digits at most: GPU rates in the hundreds, CPU smoke-test rates in the thousandths.
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


class _Footnotes:
    def __init__(self) -> None:
        self.items: dict[tuple[str, str, str], int] = {}

    def ref(self, record: Record, status: str | None = None, reason: str | None = None) -> str:
        status = status or record.status
        key = (record.provider, status, reason or record.reason or status)
        if key not in self.items:
            self.items[key] = len(self.items) + 1
        return f"{status} [{self.items[key]}]"

    def lines(self) -> list[str]:
        return [f"{n}. `{p}` {status}: {reason}" for (p, status, reason), n in self.items.items()]


def markdown(records: Sequence[Record], meta: dict, notes: Sequence[str], providers: Sequence[str]) -> str:
    lines = ["# attnkit bench", ""]
    keys = ("gpu", "device", "driver", "torch", "triton", "cupy", "flash_attn", "attnkit_commit", "date_utc")
    lines += [f"- {k}: {meta.get(k)}" for k in keys if meta.get(k) is not None]
    lines.append("")
    for note in notes:
        lines += [f"> **Note:** {note}", ""]
    footnotes = _Footnotes()
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault(r.case.group, []).append(r)
    for (mode, dtype, dim, causal), rows in groups.items():
        columns = [p for p in providers if any(r.provider == p for r in rows)]
        axis = "kv len" if mode == "decode" else "seqlen"
        title = f"{mode}, {dtype}, head dim {dim}, {'causal' if causal else 'non-causal'}"
        lines += [f"## {title}: {UNITS.get(mode, DEFAULT_UNIT)}", ""]
        if mode == "decode":
            lines += _decode_table(rows, columns, axis, footnotes)
            continue
        memory = mode == "memory"
        fixed = ["inputs MiB (q+k+v+dout)", "budget MiB"] if memory else []
        if memory:
            lines += [MEMORY_LEGEND, ""]
        lines.append(f"| {axis} | batch x heads | " + "".join(f"{f} | " for f in fixed)
                     + " | ".join(f"`{c}`" for c in columns) + " |")  # fmt: skip
        lines.append("|---:|---:|" + "---:|" * (len(fixed) + len(columns)))
        by_case: dict[Case, dict[str, Record]] = {}
        for r in rows:
            by_case.setdefault(r.case, {})[r.provider] = r
        for case, cells in by_case.items():
            values = {p: cells[p].value for p in columns if p in cells and cells[p].status == "ok"}
            numbers = [v for v in values.values() if v is not None]
            best = (min(numbers) if mode == "memory" else max(numbers)) if len(numbers) > 1 else None
            out = []
            for p in columns:
                r = cells.get(p)
                if r is None:
                    out.append("")
                elif r.status != "ok":
                    out.append(footnotes.ref(r))
                elif r.value is None:
                    out.append("-")
                else:
                    text = _fmt(r.value)
                    text = f"**{text}**" if r.value == best else text
                    out.append(_memory_cell(r, text) if memory else text)
            heads = f"{case.heads_q}/{case.heads_k}" if case.heads_q != case.heads_k else str(case.heads_q)
            out = (_memory_columns(case) if memory else []) + out
            lines.append(f"| {case.x} | {case.batch}x{heads} | " + " | ".join(out) + " |")
        lines.append("")
    if footnotes.items:
        lines += ["## Why some cells have no number", "", *footnotes.lines(), ""]
    return "\n".join(lines)


def _decode_table(rows: Sequence[Record], columns: Sequence[str], axis: str, footnotes: _Footnotes) -> list[str]:
    """Two cells per provider, eager and graph GB/s; the best of each kind in bold."""
    lines = [DECODE_LEGEND, ""]
    header = "".join(f" `{c}` eager | `{c}` graph |" for c in columns)
    lines.append(f"| {axis} | batch x heads |{header}")
    lines.append("|---:|---:|" + "---:|" * (2 * len(columns)))
    by_case: dict[Case, dict[str, Record]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.provider] = r
    for case, cells in by_case.items():
        ok = [cells[p] for p in columns if p in cells and cells[p].status == "ok"]
        eager = [r.gbps for r in ok if r.gbps is not None]
        graph = [r.graph_gbps for r in ok if r.graph_gbps is not None]
        best_eager = max(eager) if len(eager) > 1 else None
        best_graph = max(graph) if len(graph) > 1 else None
        out = []
        for p in columns:
            r = cells.get(p)
            if r is None:
                out += ["", ""]
            elif r.status != "ok":
                out += [footnotes.ref(r), ""]
            else:
                out.append(_bold(r.gbps, best_eager))
                out.append(_bold(r.graph_gbps, best_graph) if r.graph_gbps is not None
                           else footnotes.ref(r, "n/a", f"no graph: {r.graph_reason}"))  # fmt: skip
        heads = f"{case.heads_q}/{case.heads_k}" if case.heads_q != case.heads_k else str(case.heads_q)
        lines.append(f"| {case.x} | {case.batch}x{heads} | " + " | ".join(out) + " |")
    lines.append("")
    return lines


def _bold(value: float | None, best: float | None) -> str:
    if value is None:
        return "-"
    text = _fmt(value)
    return f"**{text}**" if value == best else text
