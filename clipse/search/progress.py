"""A live one-line status of a study, read from its storage: works the same whether trials run
in this process, in local workers or as SLURM jobs."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

from clipse.search.study import TrialCounts


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressLine:
    """Redraws in place on a terminal; elsewhere (CI logs, SLURM output) prints a line whenever
    the counts change and at least every ``log_every_s`` seconds."""

    def __init__(self, label: str, total: int, counts: Callable[[], TrialCounts], stream: TextIO | None = None,
                 refresh_s: float = 1.0, log_every_s: float = 60.0):
        self.label, self.total, self._counts = label, total, counts
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.refresh_s, self.log_every_s = refresh_s, log_every_s
        self.started = time.time()
        self._initial_finished: int | None = None
        self._last_text, self._last_print = "", 0.0
        self._latest: TrialCounts | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="clipse-progress", daemon=True)
        self._lock = threading.Lock()

    def render(self, counts: TrialCounts) -> str:
        if self._initial_finished is None:
            self._initial_finished = counts.finished
        elapsed = time.time() - self.started
        done_here = counts.finished - self._initial_finished
        remaining = max(0, self.total - counts.finished)
        eta = f"ETA {format_duration(elapsed / done_here * remaining)}" if done_here and remaining else (
            "ETA --" if remaining else "done")
        best = f"best {counts.best_value:.4f} (#{counts.best_number})" if counts.best_value is not None else (
            f"Pareto front {counts.front}" if counts.front else "best --")
        return (f"[{self.label}] {counts.finished}/{self.total} trials done ({counts.complete} complete, "
                f"{counts.pruned} pruned, {counts.failed} failed) | {counts.running} running | {best} | "
                f"{format_duration(elapsed)} elapsed | {eta}")

    def update(self, force: bool = False) -> None:
        try:
            counts = self._counts()
        except Exception:  # a storage hiccup must not kill the display; the next refresh retries
            return
        with self._lock:
            self._latest = counts
            text = self.render(counts)
            now = time.time()
            if self.tty:
                self.stream.write("\r\033[K" + text)
                self.stream.flush()
            elif force or text.split(" | ")[:3] != self._last_text.split(" | ")[:3] or now - self._last_print > self.log_every_s:
                self.stream.write(text + "\n")
                self.stream.flush()
                self._last_print = now
            self._last_text = text

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.update()

    def __enter__(self) -> "ProgressLine":
        self.update(force=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.update(force=not self.tty)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
