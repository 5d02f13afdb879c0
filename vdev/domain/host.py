"""The core's side of a driver domain: start the child, supervise it, restart it.

`DomainHost` owns the channel (which outlives any one child) and a supervisor thread.
The thread starts the child, watches its pidfd, and when the child dies — at once,
whatever killed it — checks the rings (what the dead child completed stays completed),
waits a backoff, and starts a new child that redoes every request left unfinished. A
child that stops answering the watchdog's pings (`DomainSpec.watchdog`: stopped,
deadlocked) is killed and replaced the same way.

A child that keeps dying (`max_failures` crashes, each within `STABLE_SECONDS` of its
start) is given up: `failure` says why, and the proxies fail requests instead of
waiting. Giving up is not for good: the supervisor keeps trying, backing off up to
`BACKOFF_MAX`, and a new front-end session (`new_session`) gets a fresh budget at
once. `failure` is cleared for each attempt (requests wait for it), set again if it
fails; a child that serves ends the given-up state.

The supervisor is a thread, not a trio task, so that supervision needs no nursery and
works the same under `vdev run`, in tests, and while no request is in flight.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vdev
from vdev.domain import control
from vdev.domain.channel import Channel
from vdev.domain.spec import DomainSpec
from vdev.plugins import Kind
from vdev.virtio.errors import GuestMemoryError
from vdev.virtio.memory import GuestMemory

log = logging.getLogger(__name__)

#: How long a child may take to build its backend and answer `ready`.
START_TIMEOUT = 30.0
#: How long the child may take to answer a control message once serving.
CONTROL_TIMEOUT = 10.0
#: How long a stopping child may take to close its backend before it is killed.
STOP_TIMEOUT = 5.0
#: A child that ran this long before dying resets the count of crashes in a row.
STABLE_SECONDS = 10.0
MAX_FAILURES = 5
#: Waits between attempts: doubling from the first to the ceiling, for ever.
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 30.0


class DomainError(Exception):
    """The driver domain cannot be started, or was given up."""


class DomainMemoryError(DomainError, GuestMemoryError):
    """The child cannot map the front-end's guest memory table (that session's fault)."""


class _StartFailure(Exception):
    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        #: The child answered with an error (bad option, missing file): not a crash.
        self.refused = refused


def describe_exit(status: int) -> str:
    """'exited with status 1', 'killed by SIGKILL' from a Popen returncode."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


@dataclass(eq=False)
class _Child:
    process: subprocess.Popen[bytes]
    pidfd: int
    sock: Any
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def reap(self) -> str:
        """Wait for the process (killing it first unless it exited); close our ends."""
        if self.process.poll() is None:
            self.kill()
        status = self.process.wait()
        os.close(self.pidfd)
        self.sock.close()
        return describe_exit(status)


class DomainHost:
    """A backend `name` of `kind` running in a supervised child process.

    `rings(attributes)` gives the channel's rings (see `channel.plan`) once the first
    child has reported the backend's attributes; requests left unfinished by a dead
    child are redone by the next, except on the rings listed in `drop_on_restart` (a
    NIC may lose the frames it was sending, not send them twice). Construction blocks
    until the first child serves and raises `DomainError` if the backend cannot be
    built.
    """

    def __init__(
        self,
        kind: Kind,
        name: str,
        options: dict[str, Any],
        spec: DomainSpec,
        rings: Callable[[dict[str, Any]], Sequence[tuple[int, int, int]]],
        *,
        drop_on_restart: Collection[int] = (),
        max_failures: int = MAX_FAILURES,
    ) -> None:
        self.kind = kind
        self.name = name
        self.label = f"{kind.label} {name!r} (driver domain)"
        self.spec = spec
        self.drop_on_restart = drop_on_restart
        self.max_failures = max_failures
        self._start_message: dict[str, Any] = {
            "op": "start",
            "kind": kind.value,
            "backend": name,
            "options": options,
            "user": spec.user,
            "netns": spec.netns,
            "seccomp": spec.seccomp,
            "log_level": logging.getLogger("vdev").getEffectiveLevel(),
        }
        try:
            json.dumps(options)
        except (TypeError, ValueError) as exc:
            raise DomainError(
                f"options must be plain values to reach a driver domain: {exc}"
            ) from None
        self._plan = rings
        self._channel: Channel | None = None
        #: Filled by the first child: the backend attributes the device reads.
        self.attributes: dict[str, Any] = {}
        #: Replayed to every new child (negotiated features...).
        self.state: dict[str, Any] = {}
        #: Children started after the first, crashes seen, requests redone after one,
        #: children killed by the watchdog, times the domain was given up.
        self.restarts = 0
        self.crashes = 0
        self.reissued = 0
        self.hangs = 0
        self.given_up = 0
        #: Why the domain was given up; None while it works (or is being tried again).
        self.failure: str | None = None
        #: The same, from giving up until a child serves again or a new session.
        self._given_up: str | None = None
        #: Crashes (or failed starts) in a row: the budget `max_failures` bounds.
        self._failures = 0
        #: The child serving now (None while it is being replaced).
        self.pid: int | None = None
        self._regions: list[tuple[list[int], int]] = []
        self._child: _Child | None = None
        self._lock = threading.Lock()  # the control socket, the memory table, _child
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # ends a backoff
        self._closed = False
        self._ready = threading.Event()
        self._start_error: str | None = None
        self._thread = threading.Thread(target=self._supervise, name=f"domain {name}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self.close()
            raise DomainError(self._start_error)

    # --- what the proxies call -----------------------------------------------------------

    @property
    def channel(self) -> Channel:
        """The rings shared with every child (made when the first one was ready)."""
        assert self._channel is not None, "no child has started yet"
        return self._channel

    @property
    def status(self) -> str:
        """'serving', 'restarting' (no child right now), 'given up' or 'stopped'."""
        if self._closed:
            return "stopped"
        if self.failure is not None:
            return "given up"
        return "serving" if self.pid is not None else "restarting"

    def new_session(self) -> None:
        """A new front-end session begins: a fresh crash budget, and a given-up domain
        is tried again at once (requests wait for it meanwhile)."""
        self._failures = 0
        if self._given_up is not None:
            log.warning("%s: new session; trying the driver domain again", self.label)
            self._given_up = None
            self._resume()
            os.eventfd_write(self._wake, 1)

    def memory_changed(self, memory: GuestMemory) -> None:
        """Send the guest memory table to the child (policy map), and keep it for the
        next ones; a table without regions unmaps all guest memory in the child.

        Blocks until the child has mapped it. Raises `DomainMemoryError` if the child
        cannot map it: the table is dropped, the child serves on without guest
        memory. A table after none starts a new session (see `new_session`).
        """
        regions = [
            ([r.guest_phys_addr, r.size, r.user_addr, r.mmap_offset], os.dup(r.fd))
            for r in memory.regions
            if r.fd is not None
        ]
        if regions and not self._regions:
            self.new_session()
        with self._lock:
            old, self._regions = self._regions, regions
            control.close_fds([fd for _, fd in old])
            child = self._child
            if child is not None:
                try:
                    self._send_memory(child)
                except DomainMemoryError:
                    self._drop_memory()
                    raise
                except control.ControlError as exc:
                    log.error("%s: memory update failed (%s); restarting it", self.label, exc)
                    child.kill()

    def resize(self, size: int) -> None:
        """Have the child's backend resize to `size` bytes (every later child too);
        OSError if it cannot."""
        with self._lock:
            child = self._child
            if child is None:
                raise OSError(errno.EAGAIN, "the driver domain is restarting; try again")
            try:
                reply = self._request(child, {"op": "resize", "size": size})
            except control.ControlError as exc:
                raise OSError(errno.EIO, f"the driver domain did not answer: {exc}") from None
            if reply.get("op") != "ok":
                raise OSError(errno.EIO, f"the driver domain: {reply.get('message')}")
            self.state["size"] = size

    def set_state(self, key: str, value: object) -> None:
        """Remember something every future child must be told when it starts."""
        with self._lock:
            self.state[key] = value

    def kill(self, reason: str) -> None:
        """The child misbehaved (broke the ring protocol): kill it; it is replaced."""
        with self._lock:
            child = self._child
        if child is not None:
            log.error("%s: %s; killing pid %d", self.label, reason, child.pid)
            child.kill()

    def stats(self) -> dict[str, int]:
        return {
            "domain_restarts": self.restarts,
            "domain_crashes": self.crashes,
            "domain_reissued": self.reissued,
            "domain_hangs": self.hangs,
            "domain_given_up": self.given_up,
            "domain_failed": int(self.failure is not None),
        }

    def close(self) -> None:
        """Stop the child (it closes its backend) and release everything."""
        if self._closed:
            return
        self._closed = True
        os.eventfd_write(self._stop, 1)
        self._thread.join()
        if self._channel is not None:
            self._channel.close()
        self._drop_memory()
        os.close(self._stop)
        os.close(self._wake)

    # --- supervision (the thread) --------------------------------------------------------

    def _supervise(self) -> None:
        try:
            self._supervise_children()
        except Exception as exc:  # a bug of ours: fail the domain, never hang waiters
            log.exception("%s: supervisor failed", self.label)
            self._give_up(f"{self.label}: supervisor failed: {exc}")

    def _supervise_children(self) -> None:
        last = ""
        while True:
            if self.failure is not None:
                self._resume()
            try:
                child = self._spawn()
            except _StartFailure as exc:
                if self._closed:
                    break
                if exc.refused and not self._ready.is_set():
                    self._start_error = str(exc)
                    self._ready.set()
                    break
                self._failures += 1
                last = f"failed to start: {exc}"
                level = logging.DEBUG if self._given_up is not None else logging.ERROR
                log.log(level, "%s: child %s", self.label, last)
            else:
                self._serving(child)
                if not self._watch(child):
                    self._stop_child(child)
                    break
                self.crashes += 1
                lived = time.monotonic() - child.started
                self._failures = 1 if lived >= STABLE_SECONDS else self._failures + 1
                last = f"pid {child.pid} {child.reap()} after {lived:.1f}s"
                self._rewind()
                log.error("%s: child %s; restarting", self.label, last)
            if self._failures >= self.max_failures:
                self._give_up(
                    f"{self.label} gave up after {self._failures} crashes in a row; last: {last}"
                )
                if not self._ready.is_set():
                    break
            if self._sleep(min(BACKOFF_FIRST * 2 ** min(self._failures - 1, 20), BACKOFF_MAX)):
                break

    def _serving(self, child: _Child) -> None:
        if not self._ready.is_set():
            self._ready.set()
            log.info("%s: running as pid %d", self.label, child.pid)
            return
        self.restarts += 1
        if self._given_up is not None:
            self._given_up = None
            log.warning("%s: serving again, as pid %d", self.label, child.pid)
        else:
            log.warning("%s: restarted as pid %d", self.label, child.pid)

    def _spawn(self) -> _Child:
        """Start a child and bring it to serving; _StartFailure if it does not get there."""
        ours, theirs = control.socketpair()
        env = dict(os.environ)
        # The child imports the very vdev the core runs, installed or not.
        root = str(Path(vdev.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "vdev.domain.child", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # the terminal's Ctrl-C is for the core
            )
        except OSError as exc:
            ours.close()
            raise _StartFailure(f"cannot run {sys.executable}: {exc.strerror}") from None
        finally:
            theirs.close()
        child = _Child(process, os.pidfd_open(process.pid), ours)
        aborts = [child.pidfd, self._stop]
        try:
            control.send(ours, self._start_message)
            reply, fds = control.receive(ours, START_TIMEOUT, abort_fds=aborts)
            control.close_fds(fds)
            if reply["op"] == "error":
                raise _StartFailure(str(reply.get("message")), refused=True)
            if reply["op"] != "ready":
                raise _StartFailure(f"answered {reply['op']!r} instead of 'ready'")
            attributes = self._check_attributes(reply.get("attributes"))
            if self._channel is None:
                try:
                    self._channel = Channel(self._plan(attributes))
                except (OSError, ValueError) as exc:
                    raise _StartFailure(f"cannot make the channel: {exc}") from None
            with self._lock:
                if self._regions:
                    try:
                        self._send_memory(child, aborts)
                    except DomainMemoryError as exc:
                        log.error("%s: %s; serving without it", self.label, exc)
                        self._drop_memory()
                serve = {
                    "op": "serve",
                    "state": self.state,
                    "layout": [layout.to_wire() for layout in self.channel.layouts],
                }
                reply = self._request(child, serve, self.channel.fds(), aborts)
                if reply["op"] != "ok":
                    raise _StartFailure(f"answered {reply['op']!r} to 'serve'")
                self._child = child
                self.pid = child.pid
        except (control.ControlError, _StartFailure) as exc:
            reason = child.reap()
            refused = isinstance(exc, _StartFailure) and exc.refused
            message = str(exc) if refused else f"{exc} ({reason})"
            raise _StartFailure(message, refused=refused) from None
        if self.attributes and attributes != self.attributes:
            log.warning(
                "%s: the new child reports %s (was %s)", self.label, attributes, self.attributes
            )
        self.attributes = self.attributes or attributes
        return child

    def _request(
        self,
        child: _Child,
        message: dict[str, Any],
        fds: Sequence[int] = (),
        aborts: Sequence[int] = (),
        timeout: float = CONTROL_TIMEOUT,
    ) -> dict[str, Any]:
        """Send a control message, return the answer. Called with the lock held."""
        control.send(child.sock, message, fds)
        reply, fds = control.receive(child.sock, timeout, abort_fds=aborts or [child.pidfd])
        control.close_fds(fds)
        return reply

    def _send_memory(self, child: _Child, aborts: Sequence[int] = ()) -> None:
        """Send the memory table, wait until it is mapped; DomainMemoryError if the
        child cannot map it. Called with the lock held."""
        message = {"op": "memory", "regions": [r for r, _ in self._regions]}
        reply = self._request(child, message, [fd for _, fd in self._regions], aborts)
        if reply["op"] == "error":
            raise DomainMemoryError(
                f"{self.label} cannot map the guest memory table: {reply.get('message')}"
            )
        if reply["op"] != "ok":
            raise control.ControlError(f"memory: answered {reply['op']!r}")

    def _drop_memory(self) -> None:
        control.close_fds([fd for _, fd in self._regions])
        self._regions = []

    def _check_attributes(self, attributes: object) -> dict[str, Any]:
        """The child is less trusted than we are: accept plain values only."""
        if not isinstance(attributes, dict) or not all(
            isinstance(k, str) and isinstance(v, int | str | bool) for k, v in attributes.items()
        ):
            raise _StartFailure(f"answered malformed attributes {attributes!r:.200}")
        return attributes

    def _watch(self, child: _Child) -> bool:
        """Sleep until the child dies (True) or we are stopping (False); ping it
        every half watchdog period meanwhile."""
        poller = select.poll()
        poller.register(child.pidfd, select.POLLIN)
        poller.register(self._stop, select.POLLIN)
        period = self.spec.watchdog / 2
        while True:
            ready = {fd for fd, _ in poller.poll(int(period * 1000) if period else None)}
            if self._stop in ready:
                return False
            if child.pidfd in ready:
                with self._lock:
                    self._child = None
                    self.pid = None
                return True
            if not ready:
                self._ping(child, period)

    def _ping(self, child: _Child, timeout: float) -> None:
        """Kill the child if it does not answer a ping within `timeout` (hung)."""
        with self._lock:
            try:
                reply = self._request(child, {"op": "ping"}, timeout=timeout)
                if reply["op"] == "pong":
                    return
                reason = f"answered {reply['op']!r}"
            except control.ControlError as exc:
                reason = str(exc)
        if _readable(child.pidfd):
            return  # it died meanwhile: _watch sees it
        self.hangs += 1
        log.error("%s: pid %d failed the watchdog (%s); killing it", self.label, child.pid, reason)
        child.kill()

    def _rewind(self) -> None:
        """Check the rings the dead child left, and count what the next one will redo
        (block I/O is idempotent: a request it had half done is simply done again)."""
        for ring in self.channel.rings if self._channel is not None else []:
            with ring.lock:
                unfinished = ring.ring.rewind(drop=ring.index in self.drop_on_restart)
            if ring.index not in self.drop_on_restart:
                self.reissued += unfinished

    def _sleep(self, seconds: float) -> bool:
        """Back off, until `new_session` at most; True if told to stop meanwhile."""
        poller = select.poll()
        poller.register(self._stop, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(int(seconds * 1000))}
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        return self._stop in ready

    def _give_up(self, message: str) -> None:
        """Fail requests from now on; log it only on entering the given-up state."""
        if self._given_up is None:
            log.error("%s", message)
            self.given_up += 1
            self._given_up = message
            if self._ready.is_set():
                log.info("%s: trying again, backing off up to %gs", self.label, BACKOFF_MAX)
        self.failure = self._given_up
        for ring in self.channel.rings if self._channel is not None else []:
            ring.wake()
        if not self._ready.is_set():
            self._start_error = message
            self._ready.set()

    def _resume(self) -> None:
        """Let requests wait for the next child again. Once each ring's lock has been
        taken, no proxy is still dropping requests on the word of the old failure."""
        self.failure = None
        for ring in self.channel.rings if self._channel is not None else []:
            with ring.lock:
                pass

    def _stop_child(self, child: _Child) -> None:
        with self._lock:
            self._child = None
            self.pid = None
            try:
                control.send(child.sock, {"op": "stop"})
            except control.ControlError as exc:
                log.debug("%s: %s", self.label, exc)
        poller = select.poll()
        poller.register(child.pidfd, select.POLLIN)
        if not poller.poll(int(STOP_TIMEOUT * 1000)):
            log.warning("%s: pid %d did not stop; killing it", self.label, child.pid)
        reason = child.reap()
        log.info("%s: pid %d %s", self.label, child.pid, reason)


def _readable(fd: int) -> bool:
    """Whether `fd` is readable now (a pidfd: its process exited). poll, not select:
    select cannot take an fd above 1023, and a daemon with many devices has those."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
