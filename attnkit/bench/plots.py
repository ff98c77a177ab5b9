"""PNG figures with matplotlib (optional: ``pip install 'attnkit[bench]'``).

One multi-panel figure per mode: fwd / bwd / fwdbwd (TFLOP/s vs sequence length, a panel per dtype, causal and
head dim), decode (GB/s vs KV length), and memory (peak MiB vs sequence length on log-log axes, where linear
memory has slope 1 and quadratic memory slope 2, with the O(seqlen) target drawn as a dotted line). attnkit
providers are solid lines, peers dashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cases import DENSE_MODES, MEMORY_TARGET, memory_budget
from .runner import Record

INSTALL_HINT = "plots need matplotlib: pip install matplotlib (or pip install 'attnkit[bench]')"

YLABEL = {"decode": "GB/s (K/V bytes read / time)", "memory": "peak extra memory (MiB)"}
TITLE = {
    "fwd": "forward",
    "bwd": "backward",
    "fwdbwd": "forward + backward",
    "decode": "decode (1 query token, KV cache): eager calls and CUDA-graph replays (dotted)",
    "memory": "peak memory of forward + backward (log-log: slope 1 linear, slope 2 quadratic)",
}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _size_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _panel_key(record: Record) -> tuple:
    c = record.case
    if c.mode == "decode":
        return (c.dtype, c.head_dim, f"{c.heads_q}/{c.heads_k} heads")
    if c.mode == "memory":
        return (c.dtype, c.head_dim, f"batch {c.batch}, {c.heads_q} heads")
    return (c.dtype, c.causal, c.head_dim)


def _panel_title(mode: str, key: tuple) -> str:
    if mode in DENSE_MODES:
        dtype, causal, dim = key
        return f"{dtype}, head dim {dim}, {'causal' if causal else 'non-causal'}"
    dtype, dim, extra = key
    return f"{dtype}, head dim {dim}, {extra}"


def _draw(ax: Any, mode: str, records: Sequence[Record], providers: Sequence[str], colors: dict) -> None:
    xs_all = sorted({r.case.x for r in records})
    for name in providers:
        points = sorted((r.case.x, r.value) for r in records if r.provider == name and r.status == "ok"
                        and r.value is not None)  # fmt: skip
        if not points:
            continue
        style = "-" if name.startswith("attnkit:") else "--"
        label = f"{name} eager" if mode == "decode" else name
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3, color=colors[name],
                label=label)  # fmt: skip
        if mode == "decode":  # CUDA-graph replays of the same step, dotted, same colour
            graph = sorted((r.case.x, r.graph_gbps) for r in records if r.provider == name and r.status == "ok"
                           and r.graph_gbps is not None)  # fmt: skip
            if graph:
                ax.plot([p[0] for p in graph], [p[1] for p in graph], ":", marker="s", markersize=3,
                        color=colors[name], label=f"{name} graph")  # fmt: skip
    if mode == "memory":
        _draw_memory_target(ax, records)
    ax.set_xscale("log", base=2)
    if mode == "memory":
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)  # rates start at zero so that gaps between providers are not exaggerated
    ax.set_xticks(xs_all)
    ax.set_xticklabels([_size_label(x) for x in xs_all], fontsize=7)
    ax.set_xlabel("KV length" if mode == "decode" else "sequence length", fontsize=8)
    ax.set_ylabel(YLABEL.get(mode, "TFLOP/s"), fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(True, alpha=0.3)


def _draw_memory_target(ax: Any, records: Sequence[Record]) -> None:
    """The largest peak extra that meets the target at each sequence length of the panel: points of a provider
    under this line pass (the inputs q, k, v, dout are outside the measured peak, so the line is the budget
    times the target minus them; see cases.MemoryBudget)."""
    cases = {r.case.x: r.case for r in records}
    xs = sorted(cases)
    ys = [memory_budget(cases[x]).max_peak_extra() / 2**20 for x in xs]
    ax.plot(xs, ys, ":", color="black", linewidth=1, label=f"target: {MEMORY_TARGET:.2f}x budget - inputs")


def _figure(plt: Any, mode: str, panels: dict, providers: Sequence[str], colors: dict, title: str) -> Any:
    keys = list(panels)
    if mode in DENSE_MODES:
        # Rows: (dtype, causal); columns: head dims -- the layout of flash-attn's README plots.
        row_keys = sorted({k[:2] for k in keys}, key=str)
        col_keys = sorted({k[2] for k in keys})
        grid = {(row_keys.index(k[:2]), col_keys.index(k[2])): k for k in keys}
        nrows, ncols = len(row_keys), len(col_keys)
    else:
        ncols = min(3, len(keys))
        nrows = (len(keys) + ncols - 1) // ncols
        grid = {(i // ncols, i % ncols): k for i, k in enumerate(keys)}
    # At least 7.5 in wide: a single panel must still fit the provider legend below it.
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.2 * ncols, 7.5), 3.2 * nrows + 0.9), squeeze=False)
    for (row, col), key in grid.items():
        ax = axes[row][col]
        _draw(ax, mode, panels[key], providers, colors)
        ax.set_title(_panel_title(mode, key), fontsize=9)
    for row in range(nrows):
        for col in range(ncols):
            if (row, col) not in grid:
                axes[row][col].set_visible(False)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.suptitle(title, fontsize=11)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(5, len(handles)), fontsize=8,
                   frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 0.95))
    return fig


def plot_results(records: Sequence[Record], out_dir: Path, providers: Sequence[str], gpu: str | None = None,
                 separate: bool = False) -> list[Path]:  # fmt: skip
    """Write the figures; returns their paths. ``separate`` writes one file per panel instead."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    colors = {name: cmap(i % 10) for i, name in enumerate(providers)}
    files: list[Path] = []
    for mode in ("fwd", "bwd", "fwdbwd", "decode", "memory"):
        mode_records = [r for r in records if r.case.mode == mode]
        if not any(r.status == "ok" and r.value is not None for r in mode_records):
            continue  # e.g. memory on CPU, where no peak is measured
        panels: dict[tuple, list[Record]] = {}
        for r in mode_records:
            panels.setdefault(_panel_key(r), []).append(r)
        title = TITLE[mode] + (f" on {gpu}" if gpu else "")
        if separate:
            for i, (key, recs) in enumerate(panels.items()):
                fig = _figure(plt, mode, {key: recs}, providers, colors, title)
                files.append(_save(plt, fig, out_dir / f"{mode}_{i + 1}.png"))
        else:
            fig = _figure(plt, mode, panels, providers, colors, title)
            files.append(_save(plt, fig, out_dir / f"{mode}.png"))
    return files


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")  # single panels are narrower than their legend
    plt.close(fig)
    return path
