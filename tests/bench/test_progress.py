"""`vdev bench` progress: its lines, the runs left, the time estimate (on a fake clock)."""

from __future__ import annotations

import io
import re

import pytest

from vdev.bench import blk
from vdev.bench.core import BenchSettings, Target, run_label, schedule, start_progress
from vdev.bench.progress import Progress, duration

LINE = re.compile(
    r"vdev bench: run (\d+)/(\d+): (.+); (the last run|(\d+) more after it); "
    r"(time left unknown until a run ends|about (.+) left)$"
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def seconds(text: str) -> float:
    """The inverse of `duration` (for the forms it writes)."""
    units = {"h": 3600, "min": 60, "s": 1}
    parts = text.split()
    return sum(int(n) * units[u] for n, u in zip(parts[::2], parts[1::2], strict=True))


def drive(plan: list[str], times: dict[str, float]) -> list[re.Match[str]]:
    """Run `plan` with each key taking `times[key]` fake seconds; the parsed lines."""
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(plan, out, clock=clock, tty=False)
    for key in plan:
        with progress.run(f"target {key}"):
            clock.now += times[key]
    lines = out.getvalue().splitlines()
    matches = [match for line in lines if (match := LINE.match(line))]
    assert len(matches) == len(lines) == len(plan), lines  # one line per run, nothing else
    return matches


def test_one_line_per_run_counting_the_runs_left() -> None:
    lines = drive(["a", "b", "a"], {"a": 10, "b": 10})
    assert [(m[1], m[2], m[3]) for m in lines] == [
        ("1", "3", "target a"),
        ("2", "3", "target b"),
        ("3", "3", "target a"),
    ]
    assert [m[4] for m in lines] == ["2 more after it", "1 more after it", "the last run"]
    assert lines[0][6] == "time left unknown until a run ends"


def test_the_estimate_shrinks_run_by_run() -> None:
    lines = drive(["a"] * 5, {"a": 42})
    left = [seconds(m[7]) for m in lines[1:]]
    assert left == [4 * 42, 3 * 42, 2 * 42, 42]


def test_the_estimate_uses_each_targets_own_duration() -> None:
    lines = drive(["fast", "slow", "fast", "slow", "fast"], {"fast": 10, "slow": 300})
    # After run 1 only "fast" is known: every run left is guessed at its 10 s.
    assert seconds(lines[1][7]) == 4 * 10
    # From run 3 on both are known: fast + slow + fast, then slow + fast, then fast.
    assert [seconds(m[7]) for m in lines[2:]] == [320, 310, 10]


def test_a_terminal_gets_one_line_rewritten_and_erased(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(["a", "b"], out, clock=clock, tty=True)
    with progress.run("target a"):
        assert out.getvalue() == "\r\x1b[K" + progress_line(1, "target a")
        clock.now += 5
    with progress.run("target b"):
        pass
    text = out.getvalue()
    assert "\n" not in text and text.endswith("\r\x1b[K")  # erased: the log stays clean
    assert text.count("vdev bench: run") == 2 and "about 5 s left" in text


def test_a_terminal_line_fits_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    out = io.StringIO()
    with Progress(["a"], out, clock=FakeClock(), tty=True).run("a very long target title " * 4):
        assert len(out.getvalue().removeprefix("\r\x1b[K")) == 39  # no wrap to a 2nd line


def progress_line(number: int, label: str) -> str:
    return (
        f"vdev bench: run {number}/2: {label}; 1 more after it; time left unknown until a run ends"
    )


def test_a_failed_run_is_not_counted() -> None:
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(["a", "a"], out, clock=clock, tty=False)
    with pytest.raises(RuntimeError), progress.run("target a"):
        raise RuntimeError("the guest died")
    assert progress.done == 0 and progress.estimate() is None


def test_no_stream_is_silent() -> None:
    progress = Progress(["a"], None, clock=FakeClock())
    with progress.run("target a"):
        pass
    assert progress.done == 1


@pytest.mark.parametrize(
    ("value", "text"), [(0.4, "0 s"), (59, "59 s"), (250, "4 min 10 s"), (3900, "1 h 05 min")]
)
def test_duration(value: float, text: str) -> None:
    assert duration(value) == text


def test_schedule_rotates_and_skips_targets_without_workloads() -> None:
    targets = [Target(n, n.upper(), "blk", blk.builtin) for n in "ab"]
    targets.append(Target("n", "N", "net", blk.builtin))
    runs = schedule(targets, blk.WORKLOADS, 2)
    assert [(r.repetition, r.target.name) for r in runs] == [(0, "a"), (0, "b"), (1, "b"), (1, "a")]
    assert all(r.workloads == blk.WORKLOADS for r in runs)
    out = io.StringIO()
    progress = start_progress(runs, out)
    assert progress.plan == ["a", "b", "b", "a"] and not progress.tty
    label = run_label(runs[2], BenchSettings(repetitions=2))
    assert label == "B: " + ", ".join(w.name for w in blk.WORKLOADS) + " (repetition 2/2)"
