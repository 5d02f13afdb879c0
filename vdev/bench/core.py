"""The benchmark runner: targets (rows) x workloads (columns), repeated, medians kept.

A `Target` is one service model: a way to give the guest a device (vdev in-process,
vdev in a driver domain, a C reference such as qemu-storage-daemon, QEMU's built-in
device). Its `setup` starts whatever serves the device and yields the QEMU arguments
that attach it. A `Workload` is one measurement made inside the guest on a device of
its `kind`. `run_bench` boots the same guest once per target and repetition, runs every
workload of the target's kind in it, and collects the figures; repetitions rotate the
order of the targets so that slow drifts of a noisy machine spread over all of them.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TextIO

import trio

from vdev.bench.progress import Progress
from vdev.qemu import choose_accel
from vdev.testing.guest import GuestImage, build_guest, run_guest

log = logging.getLogger(__name__)

#: Printed by the guest around each workload's output.
BEGIN, END = "@@vdev-bench-begin", "@@vdev-bench-end"
#: Key of a workload's headline figure in its measurements.
VALUE = "value"


class BenchError(RuntimeError):
    """The benchmark cannot run, or a workload failed in the guest."""


@dataclass(frozen=True)
class BenchSettings:
    """How long and how big: shared by every target and workload of a run."""

    repetitions: int = 5
    #: Seconds each workload measures (after `ramp` seconds of warm-up).
    runtime: float = 10.0
    ramp: float = 2.0
    #: Bytes of the disk image (blk).
    size: int = 1 << 30
    cpus: int = 1
    mem: str = "512M"
    accel: str = "auto"
    #: Directory for the image and sockets (default: the system's temporary directory).
    workdir: Path | None = None
    #: aio= of qemu-storage-daemon's file node (threads, native, io_uring).
    qsd_aio: str = "threads"


@dataclass(frozen=True)
class BenchContext:
    """What a target's setup gets: a private directory and the shared resources."""

    workdir: Path
    settings: BenchSettings
    #: The disk image every blk target serves (same file, same content).
    image: Path
    #: Whether the image's file system supports O_DIRECT (all targets then bypass the
    #: host page cache; else none does).
    direct: bool


@dataclass(frozen=True)
class Workload:
    """One measurement made in the guest; subclasses write the script and parse it."""

    name: str
    title: str
    kind: str
    #: Unit of the headline figure (`VALUE`), e.g. "IOPS" or "MiB/s".
    unit: str
    #: Extra figures worth a line of their own in the table: (key, label) pairs.
    extras: tuple[tuple[str, str], ...] = ()
    #: Host programs the guest needs for this workload (see `build_guest`).
    binaries: tuple[str, ...] = ()

    def script(self, settings: BenchSettings) -> str:
        """Guest shell commands that print this workload's raw result."""
        raise NotImplementedError

    def parse(self, output: str) -> dict[str, float]:
        """Figures from the script's output: `VALUE` and any extras (latencies...)."""
        raise NotImplementedError


#: A target's setup: an async context manager serving the device while it is open and
#: yielding the QEMU arguments that attach it to the guest.
Setup = Callable[[BenchContext], AbstractAsyncContextManager[list[str]]]


@dataclass(frozen=True)
class Target:
    """A row: one way of serving the device to the guest."""

    name: str
    title: str
    kind: str
    setup: Setup
    #: The row every other row is compared with.
    reference: bool = False


@dataclass
class BenchResult:
    """Every run's figures, and the medians and ratios the report shows."""

    settings: BenchSettings
    targets: list[Target]
    workloads: list[Workload]
    #: (target name, workload name) -> one dict of figures per repetition.
    runs: dict[tuple[str, str], list[dict[str, float]]] = field(default_factory=dict)
    seconds: float = 0.0
    accel: str = ""

    @property
    def reference(self) -> Target | None:
        return next((t for t in self.targets if t.reference), None)

    def workloads_of(self, target: Target) -> list[Workload]:
        return [w for w in self.workloads if w.kind == target.kind]

    def median(self, target: str, workload: str, key: str = VALUE) -> float | None:
        values = [run[key] for run in self.runs.get((target, workload), []) if key in run]
        return statistics.median(values) if values else None

    def ratio(self, target: str, workload: str) -> float | None:
        """`target`'s median over the reference's (None without a reference figure)."""
        reference = self.reference
        if reference is None:
            return None
        ours = self.median(target, workload)
        theirs = self.median(reference.name, workload)
        if ours is None or not theirs:
            return None
        return ours / theirs


def guest_script(workloads: Sequence[Workload], settings: BenchSettings) -> str:
    """The workloads one after the other, each output between `BEGIN` and `END` lines."""
    parts = []
    for w in workloads:
        parts += [
            f'echo "{BEGIN} {w.name}"',
            w.script(settings).strip(),
            f'echo "{END} {w.name} $?"',
        ]
    return "\n".join(parts) + "\n"


def split_output(output: str) -> dict[str, tuple[str, int]]:
    """Workload name -> (its output, its exit status), from `guest_script`'s output."""
    found = {}
    for chunk in output.split(f"{BEGIN} ")[1:]:
        name, _, rest = chunk.partition("\n")
        body, sep, tail = rest.partition(f"{END} {name} ")
        if sep:
            found[name] = (body, int(tail.split()[0]))
    return found


def rotation(targets: Sequence[Target], repetition: int) -> list[Target]:
    """The targets in the order repetition `repetition` runs them."""
    shift = repetition % len(targets) if targets else 0
    return [*targets[shift:], *targets[:shift]]


@dataclass(frozen=True)
class Run:
    """One boot of a target (or one back-end start): the workloads measured in it."""

    repetition: int
    target: Target
    workloads: list[Workload]


def schedule(
    targets: Sequence[Target], workloads: Sequence[Workload], repetitions: int
) -> list[Run]:
    """Every run of a benchmark in order: repetitions rotate the targets (see `rotation`);
    a target with no workload of its kind has no run."""
    runs = []
    for repetition in range(repetitions):
        for target in rotation(targets, repetition):
            mine = [w for w in workloads if w.kind == target.kind]
            if mine:
                runs.append(Run(repetition, target, mine))
    return runs


def start_progress(runs: Sequence[Run], stream: TextIO | None) -> Progress:
    """Progress of `runs` on `stream` (None: silent), time estimates kept per target."""
    return Progress([run.target.name for run in runs], stream)


def run_label(run: Run, settings: BenchSettings) -> str:
    """What a progress line says is running."""
    names = ", ".join(w.name for w in run.workloads)
    return f"{run.target.title}: {names} (repetition {run.repetition + 1}/{settings.repetitions})"


async def run_target(
    target: Target,
    workloads: Sequence[Workload],
    context: BenchContext,
    image: GuestImage,
    accel: str,
) -> dict[str, dict[str, float]]:
    """Boot the guest on `target` once and run `workloads`: name -> figures."""
    settings = context.settings
    per_workload = settings.runtime + settings.ramp + 15.0
    timeout = 120.0 + len(workloads) * per_workload * 3
    async with target.setup(context) as qemu_args:
        result = await run_guest(
            guest_script(workloads, settings),
            qemu_args=qemu_args,
            mem=settings.mem,
            cpus=settings.cpus,
            accel=accel,
            timeout=timeout,
            image=image,
        )
    outputs = split_output(result.output)
    figures = {}
    for w in workloads:
        if w.name not in outputs:
            raise BenchError(f"{target.name}: no result for {w.name}:\n{result.output[-2000:]}")
        text, status = outputs[w.name]
        if status != 0:
            raise BenchError(f"{target.name}: {w.name} failed (status {status}):\n{text[-2000:]}")
        figures[w.name] = w.parse(text)
    return figures


async def run_bench(
    targets: Sequence[Target],
    workloads: Sequence[Workload],
    settings: BenchSettings,
    *,
    prepare: Callable[[Path, BenchSettings], tuple[Path, bool]],
    progress: TextIO | None = None,
) -> BenchResult:
    """Run every target's workloads `settings.repetitions` times.

    `prepare(directory, settings)` creates the shared disk image in the run's private
    directory and returns it, with whether O_DIRECT works there. Each run is reported
    on `progress` as it starts (see `Progress`).
    """
    if not targets:
        raise BenchError("no targets selected")
    result = BenchResult(settings, list(targets), list(workloads))
    started = time.monotonic()
    binaries = dict.fromkeys(b for w in workloads for b in w.binaries)
    image = await build_guest(extra_binaries=list(binaries))
    accel = await trio.to_thread.run_sync(
        partial(choose_accel, settings.accel, kernel=image.kernel, initrd=image.initramfs)
    )
    result.accel = accel
    with tempfile.TemporaryDirectory(prefix="vdev-bench-", dir=settings.workdir) as tmp:
        root = Path(tmp)
        disk, direct = await trio.to_thread.run_sync(prepare, root, settings)
        runs = schedule(targets, workloads, settings.repetitions)
        reporter = start_progress(runs, progress)
        for run in runs:
            workdir = root / f"{run.target.name}-{run.repetition}"
            workdir.mkdir()
            context = BenchContext(workdir, settings, disk, direct)
            with reporter.run(run_label(run, settings)):
                figures = await run_target(run.target, run.workloads, context, image, accel)
            for name, values in figures.items():
                result.runs.setdefault((run.target.name, name), []).append(values)
                log.info("%s, %s: %s", run.target.name, name, _brief(values))
    result.seconds = time.monotonic() - started
    return result


def _brief(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in values.items())


#: How long a daemon may take to create its socket, and to exit on SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def _pin(cpu: int) -> Callable[[], None] | None:
    """A preexec_fn pinning a child to `cpu`, on a machine with more than one CPU."""
    if (os.cpu_count() or 1) < 2:
        return None
    return partial(os.sched_setaffinity, 0, {cpu})


@asynccontextmanager
async def daemon(
    argv: Sequence[str], sock: Path, log_path: Path, *, cpu: int | None = None
) -> AsyncIterator[trio.Process]:
    """`argv` running until the block exits, once it has created `sock`; then SIGTERM.

    With `cpu`, the process (and the threads it starts) runs on that CPU only.
    """
    preexec = _pin(cpu) if cpu is not None else None
    with log_path.open("wb") as out:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
        )
    try:
        with trio.move_on_after(START_TIMEOUT):
            while not sock.exists() and process.poll() is None:
                await trio.sleep(0.02)
        if not sock.exists():
            raise BenchError(f"{argv[0]} did not create {sock}:\n{log_path.read_text()[-2000:]}")
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT):
                    await process.wait()
            if process.poll() is None:
                process.kill()
                await process.wait()
