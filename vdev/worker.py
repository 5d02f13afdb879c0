"""Queue workers: the data plane, one OS thread per queue (per queue pair for net).

A `QueueWorker` serves the vrings of one group (`Device.queue_group`) on a thread of
its own, as rust-vmm's `VringEpollHandler` and QEMU's iothreads do. It calls the
device's handler inline for every ring that may have work, then spins on the rings for
an adaptive while (`AdaptivePoll`), and only then re-enables kicks and sleeps in epoll
on the kick eventfds, the fds the device asks for (a TAP, an executor's completion
fd) and its own wake eventfd (attach/detach commands, frames from other threads).

The trio side never blocks: `QueueWorker.run` is a task in the session's nursery that
owns the thread, and `attach` / `detach` are commands the thread carries out between
batches; `detach` returns once the device completed what that ring had in flight.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import trio

from vdev.devices.base import Device
from vdev.virtio.errors import VirtioError

if TYPE_CHECKING:
    from vdev.vring import Vring

log = logging.getLogger(__name__)

#: Longest spin on idle rings before sleeping, by default (QEMU's aio-poll and
#: cloud-hypervisor spin 32-50 us): a kick costs a wake-up of ~50 us on these VMs, so
#: a spin that catches the next request halves QD1 latency (perfcheck-style blkload
#: p50 81 us against 116-130 us without). `vdev run --poll-us` changes it (0: never).
POLL_MAX = 50e-6
#: First spin once sleeping has proved too costly; doubled while it pays off.
POLL_START = 4e-6
_READ = select.EPOLLIN


class AdaptivePoll:
    """How long to spin before sleeping, learnt from how long sleeps turn out.

    QEMU's rule: a sleep that ended within `limit` would have been caught by a longer
    spin, so the spin grows (from `POLL_START`, doubling); a longer sleep means
    spinning is wasted, so it stops. An idle device never spins.
    """

    __slots__ = ("limit", "seconds")

    def __init__(self, limit: float = POLL_MAX) -> None:
        self.limit = limit
        self.seconds = 0.0

    def slept(self, seconds: float) -> None:
        if seconds > self.limit:
            self.seconds = 0.0
        elif seconds > self.seconds:
            self.seconds = min(max(2 * self.seconds, POLL_START), self.limit)


class QueueWorker:
    """The thread serving one group of a device's vrings."""

    def __init__(self, device: Device, group: int, poll_max: float = POLL_MAX) -> None:
        self.device = device
        self.group = group
        self.poll = AdaptivePoll(poll_max)
        self._rings: list[Vring] = []
        self._commands: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        #: Set once the thread is gone: commands then run in the caller's thread.
        self._dead = False
        self._ep = select.epoll()
        #: fd -> the vring whose kick fd it is (None: other fds) in the epoll set.
        self._watched: dict[int, Vring | None] = {}
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: Written by the thread when it exits (the trio task waits on it).
        self._exit_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sleeping = False
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=f"vdev-q{group}", daemon=True)

    # --- control (trio side) ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the thread: start it, and on cancellation stop it after its work."""
        self._thread.start()
        try:
            task_status.started()
            await trio.lowlevel.wait_readable(self._exit_fd)
        finally:
            with trio.CancelScope(shield=True):
                self._command(self._stop)
                await trio.to_thread.run_sync(self._thread.join)
                for fd in (self._wake_fd, self._exit_fd):
                    trio.lowlevel.notify_closing(fd)
                    os.close(fd)

    def attach(self, vring: Vring) -> None:
        """Start serving `vring` (its ring is built)."""
        self._command(lambda: self._attach(vring))

    async def detach(self, vring: Vring) -> None:
        """Stop serving `vring` once the device completed what it has in flight."""
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def command() -> None:
            try:
                self._detach(vring)
            finally:
                token.run_sync_soon(done.set)

        self._command(command)
        await done.wait()

    @property
    def idle(self) -> bool:
        """The thread is asleep, waiting for a kick or a command."""
        return self._sleeping

    @property
    def dead(self) -> bool:
        """The thread has exited (stopped, or crashed)."""
        return self._dead

    def wake(self) -> None:
        """Make the thread look at its rings again (safe from any thread).

        Whoever calls it has made the work visible first (a frame queued): a thread
        about to sleep checks for work after saying so, so one of the two sees it.
        """
        if self._sleeping:
            self._signal()

    def _command(self, command: Callable[[], None]) -> None:
        with self._lock:
            if not self._dead:
                self._commands.append(command)
                self._signal()
                return
        command()

    def _signal(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.eventfd_write(self._wake_fd, 1)

    # --- the thread ---------------------------------------------------------------------

    def _main(self) -> None:
        self._ep.register(self._wake_fd, _READ)
        self._watched = {self._wake_fd: None}
        try:
            self._loop()
        except BaseException:
            log.exception("queue worker %d crashed; its queues are stopped", self.group)
            for vring in self._rings:
                vring.fail("queue worker crashed")
        finally:
            with self._lock:
                self._dead = True
            while self._commands:
                self._commands.popleft()()
            self._ep.close()
            os.eventfd_write(self._exit_fd, 1)

    def _loop(self) -> None:
        handle = self.device.handle
        while True:
            while self._commands:
                self._commands.popleft()()
            if self._stopping:
                return
            for vring in self._rings:
                if vring.active:
                    self._run(handle, vring)
            if self._has_work():
                continue
            if self.poll.seconds and self._spin():
                continue
            if not self._arm():
                self._disarm()
                continue
            self._watch()
            self._sleeping = True
            if self._commands or self._has_work():
                self._sleeping = False
                self._disarm()
                continue
            started = time.monotonic()
            events = _epoll_wait(self._ep)
            self._sleeping = False
            self.poll.slept(time.monotonic() - started)
            for fd, _ in events:
                vring = self._watched.get(fd)
                if fd == self._wake_fd:
                    _drain(fd)
                elif vring is not None and fd == vring.kick_fd and _drain(fd):
                    vring.kicks += 1
            self._disarm()

    def _run(self, handle: Callable[[Vring], object], vring: Vring) -> None:
        """One pass of the device over `vring`; a fault stops that ring only."""
        try:
            handle(vring)
            if vring.memory is not None:
                vring.memory.check()  # a front-end that shrank its memory file
        except VirtioError as exc:
            vring.fail(str(exc))
        except Exception:
            log.exception("queue %d: device handler crashed; queue stopped", vring.index)
            vring.fail("device handler crashed")
        ring = vring.ring
        if ring is not None and ring.broken:
            vring.fail(str(ring.failure).removeprefix(f"queue {vring.index}: "))

    def _has_work(self) -> bool:
        return any(self._busy())

    def _busy(self) -> Iterator[Vring]:
        """The rings that may have work (lazily: `any` stops at the first)."""
        device = self.device
        for vring in self._rings:
            if vring.active and (vring.ring.has_available() or device.has_work(vring)):  # type: ignore[union-attr]
                yield vring

    def _spin(self) -> bool:
        """Look at the rings until `poll.seconds` pass; True if work showed up.

        Each look yields the CPU and the GIL (`os.sched_yield`, 0.5 us here), so that
        the front-end, the event loop and other workers run meanwhile. Not
        `time.sleep(0)`: that is a real sleep of about 100 us on these VMs.
        """
        deadline = time.monotonic() + self.poll.seconds
        while time.monotonic() < deadline:
            if self._commands:
                return True
            found = False
            for vring in self._busy():
                vring.polls += 1
                found = True
            if found:
                return True
            os.sched_yield()
        return False

    def _disarm(self) -> None:
        """No kicks while awake: the thread looks at the rings itself."""
        for vring in self._rings:
            if vring.active:
                vring.ring.disable_kicks()  # type: ignore[union-attr]

    def _arm(self) -> bool:
        """Ask for kicks on every ring; False if buffers arrived meanwhile."""
        armed = True
        for vring in self._rings:
            if vring.active and vring.ring.enable_kicks():  # type: ignore[union-attr]
                armed = False
        return armed

    def _watch(self) -> None:
        """Bring the epoll set to the kick fds and the fds the device asks for."""
        wanted: dict[int, Vring | None] = {self._wake_fd: None}
        for vring in self._rings:
            if not vring.active:
                continue
            if vring.kick_fd is not None:
                wanted[vring.kick_fd] = vring
            for fd in self.device.wait_fds(vring):
                wanted.setdefault(fd, None)
        watched = self._watched
        for fd in watched.keys() - wanted.keys():
            self._unwatch(fd)
        for fd in wanted.keys() - watched.keys():
            self._ep.register(fd, _READ)
        self._watched = wanted

    def _unwatch(self, fd: int) -> None:
        with contextlib.suppress(OSError, ValueError):  # closed fd, or closed epoll
            self._ep.unregister(fd)
        self._watched.pop(fd, None)

    def _attach(self, vring: Vring) -> None:
        self._rings.append(vring)
        try:
            self.device.start_queue(vring)
        except Exception as exc:
            log.exception("queue %d: the device could not start it", vring.index)
            vring.fail(f"the device could not start the queue: {exc}")
        if vring.ring is not None:
            vring.ring.disable_kicks()

    def _detach(self, vring: Vring) -> None:
        """Complete what `vring` has in flight, then forget it (and its fds)."""
        if vring not in self._rings:
            return
        try:
            self.device.stop_queue(vring)
        except Exception:
            log.exception("queue %d: the device failed while stopping it", vring.index)
        self._rings.remove(vring)
        # Its kick fd may be closed and its number reused: forget every fd we watch
        # and let the next sleep register what is still wanted.
        for fd in list(self._watched):
            if fd != self._wake_fd:
                self._unwatch(fd)

    def _stop(self) -> None:
        self._stopping = True


def _drain(fd: int) -> bool:
    """Read an eventfd; False if it had nothing (a spurious wake-up)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True


def _epoll_wait(ep: select.epoll) -> list[tuple[int, int]]:
    while True:
        try:
            return ep.poll()
        except InterruptedError:
            continue


class QueueWorkers:
    """The workers of one session, one per queue group, as tasks of its nursery."""

    def __init__(self, device: Device, nursery: trio.Nursery, poll_max: float = POLL_MAX) -> None:
        self.device = device
        self.poll_max = poll_max
        self._nursery = nursery
        self._workers: dict[int, QueueWorker] = {}

    async def get(self, queue_index: int) -> QueueWorker:
        """The worker of `queue_index`'s group, started if need be."""
        group = self.device.queue_group(queue_index)
        worker = self._workers.get(group)
        if worker is None or worker.dead:
            worker = QueueWorker(self.device, group, self.poll_max)
            await self._nursery.start(worker.run)
            self._workers[group] = worker
        return worker
