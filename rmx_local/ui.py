"""Terminal output: Rich panels and progress bars on a TTY, plain timestamped lines otherwise (CI, pipes, logs)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class StageBar:
    """Progress of one stage: `advance(items, tokens)`; tokens/s is shown when tokens are counted."""

    def __init__(self, ui: "UI", name: str, total: int, unit: str):
        self.ui, self.name, self.total, self.unit = ui, name, total, unit
        self.done, self.tokens, self.start = 0, 0, time.time()
        self._task = None
        self._last_line = 0.0

    def advance(self, items: int = 0, tokens: int = 0) -> None:
        self.done += items
        self.tokens += tokens
        rate = self.tokens / max(time.time() - self.start, 1e-9)
        if self.ui.progress is not None and self._task is not None:
            extra = f"{rate:,.0f} tok/s" if self.tokens else ""
            self.ui.progress.update(self._task, completed=self.done, extra=extra)
        elif (items or tokens) and (time.time() - self._last_line > 10 or (items and self.done >= self.total)):
            self._last_line = time.time()
            tok = f", {rate:,.0f} tok/s" if self.tokens else ""
            elapsed = time.time() - self.start
            eta = f", ETA {elapsed * (self.total - self.done) / self.done:.0f} s" if 0 < self.done < self.total else ""
            self.ui.line(f"{self.name}: {self.done}/{self.total} {self.unit}{tok}{eta}")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.time() - self.start, 1e-9)


class UI:
    def __init__(self, rich: bool | None = None):
        self.console = Console(stderr=False)
        self.rich = sys.stdout.isatty() if rich is None else rich
        self.progress: Progress | None = None

    def line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        elif self.rich:
            self.console.print(text, markup=False, highlight=False)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def panel(self, title: str, body: str) -> None:
        if self.rich:
            self.console.print(Panel(body, title=title, expand=False))
        else:
            self.line(title)
            print(body, flush=True)

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        if self.rich:
            t = Table(title=title)
            for c in columns:
                t.add_column(c, justify="right" if c != columns[0] else "left")
            for r in rows:
                t.add_row(*r)
            self.console.print(t)
        else:
            widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
            print(title, flush=True)
            print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
            for r in rows:
                print("  ".join(v.ljust(w) for v, w in zip(r, widths)), flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, total: int, unit: str = "items") -> Iterator[StageBar]:
        bar = StageBar(self, name, total, unit)
        if self.rich:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self.progress.start()
            bar._task = self.progress.add_task(name, total=total, extra="")
        else:
            self.line(f"{name}: start ({total} {unit})")
        try:
            yield bar
        finally:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None


class SilentUI(UI):
    """Prints nothing: the UI of torchrun ranks other than 0 (rank 0 tells the story once)."""

    def __init__(self):
        super().__init__(rich=False)

    def line(self, text: str) -> None:
        pass

    def panel(self, title: str, body: str) -> None:
        pass

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        pass
