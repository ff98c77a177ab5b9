"""Progress display: rich if installed, else tqdm, else one plain line per result (also the CI/log format)."""

from __future__ import annotations

import sys
from typing import Any, TextIO


class Progress:
    def start(self, total: int) -> None: ...

    def advance(self, description: str) -> None: ...

    def log(self, message: str) -> None: ...

    def close(self) -> None: ...


class PlainProgress(Progress):
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.total = 0
        self.done = 0

    def start(self, total: int) -> None:
        self.total, self.done = total, 0

    def advance(self, description: str) -> None:
        self.done += 1
        width = len(str(self.total))
        print(f"[{self.done:>{width}}/{self.total}] {description}", file=self.stream, flush=True)

    def log(self, message: str) -> None:
        print(message, file=self.stream, flush=True)


class TqdmProgress(Progress):
    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar: Any = None

    def start(self, total: int) -> None:
        self.bar = self._tqdm(total=total, unit="run", dynamic_ncols=True)

    def advance(self, description: str) -> None:
        self.bar.write(description)
        self.bar.update(1)

    def log(self, message: str) -> None:
        self._tqdm.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RichProgress(Progress):
    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.task: Any = None

    def start(self, total: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("bench", total=total)

    def advance(self, description: str) -> None:
        self.bar.console.print(description, highlight=False, markup=False)
        self.bar.advance(self.task)

    def log(self, message: str) -> None:
        self.bar.console.print(message, highlight=False, markup=False)

    def close(self) -> None:
        self.bar.stop()


def make_progress(kind: str = "auto") -> Progress:
    """``auto``: a live bar when stdout is a terminal and rich (else tqdm) is installed, else plain lines, so logs
    captured by CI or a remote runner stay readable. ``rich``/``tqdm`` force one (plain if not installed)."""
    if kind == "plain" or (kind == "auto" and not sys.stdout.isatty()):
        return PlainProgress()
    factories = {"rich": (RichProgress,), "tqdm": (TqdmProgress,)}.get(kind, (RichProgress, TqdmProgress))
    for factory in factories:
        try:
            return factory()
        except ImportError:
            continue
    return PlainProgress()
