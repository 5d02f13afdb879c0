"""Progress of a benchmark on stderr: which run, how many remain, about how long is left.

A log file (or any stream that is not a terminal) gets one line per run, written when the
run starts. A terminal gets a single line, rewritten at the start of each run and erased
at its end, so the run's own log lines never share it. The time left is estimated from
the runs done so far: the mean duration of the same key (a target) where one has run,
else of all runs.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

#: Rewrite a terminal's current line: carriage return, then erase to its end.
_REWRITE = "\r\x1b[K"


def duration(seconds: float) -> str:
    """``"45 s"``, ``"4 min 10 s"``, ``"1 h 05 min"``."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


class Progress:
    """Reports the runs of `plan` (one key per run, in order) as they start, to `stream`."""

    def __init__(
        self,
        plan: Sequence[str],
        stream: TextIO | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        self.plan = list(plan)
        self.stream = stream
        self.clock = clock
        self.tty = bool(stream is not None and stream.isatty()) if tty is None else tty
        self.done = 0
        self._durations: dict[str, list[float]] = {}

    def estimate(self) -> float | None:
        """Seconds the runs not yet finished should take; None before any run finished."""
        every = [d for durations in self._durations.values() for d in durations]
        if not every:
            return None
        overall = statistics.mean(every)
        return sum(
            statistics.mean(self._durations[key]) if key in self._durations else overall
            for key in self.plan[self.done :]
        )

    def line(self, label: str) -> str:
        """The report of the run about to start (run number `done` + 1)."""
        total = len(self.plan)
        after = total - self.done - 1
        remaining = "the last run" if after == 0 else f"{after} more after it"
        left = self.estimate()
        eta = (
            "time left unknown until a run ends" if left is None else f"about {duration(left)} left"
        )
        return f"vdev bench: run {self.done + 1}/{total}: {label}; {remaining}; {eta}"

    @contextmanager
    def run(self, label: str) -> Iterator[None]:
        """Report the next run of the plan while the block runs it, then time it."""
        key = self.plan[self.done]
        self._write(self.line(label))
        started = self.clock()
        try:
            yield
        finally:
            if self.tty:
                self._emit(_REWRITE)
        self._durations.setdefault(key, []).append(self.clock() - started)
        self.done += 1

    def _write(self, line: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self._emit(_REWRITE + line[:width])
        else:
            self._emit(line + "\n")

    def _emit(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text)
            self.stream.flush()
