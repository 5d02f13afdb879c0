"""The driver-domain child: builds the real backend and serves the channel's rings.

Started by the core as ``python -m vdev.domain.child FD`` (FD: its end of the control
socket), in a fresh interpreter, so it inherits none of the core's memory. Startup:

1. receive ``start`` (backend name and options, isolation);
2. enter the network namespace, build the backend, drop to the user, load seccomp;
3. answer ``ready`` with the backend's attributes (size, vnet_hdr, ...);
4. receive the guest memory table (``memory``, policy ``map``) if there is one, then
   ``serve`` (channel memfd and eventfds, state to restore), and serve: pop
   requests with vdev.virtio's SplitQueue (the device side), call the backend, push
   completions. A ring starts where the previous child's used index stopped, so a
   restarted child redoes exactly what its predecessor left unfinished.

While serving, the control socket carries ``memory`` (the guest memory table, policy
``map``; an empty one unmaps it all), ``ping`` (the core's watchdog) and ``stop``.
Guest memory and the channel are mapped in two `GuestMemory` objects: ring
descriptors only ever point into the channel, segment tables only into guest memory,
so a front-end's guest addresses cannot collide with the channel's.

The loop may poll the rings after each batch before sleeping on the eventfds: a
wake-up costs far more than a short spin. The poll time adapts (`AdaptivePoll`): a
device streaming requests keeps the child polling between batches; an idle one, or one
whose guest thinks between requests, costs no CPU.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from vdev.backend import BackendError, BlockBackend, NetBackend
from vdev.devices.blk_requests import BlkRequest, Range, RequestType, Status, execute
from vdev.domain import confine, control
from vdev.domain.channel import (
    CHANNEL_GPA,
    REQUEST,
    RESULT,
    AdaptivePoll,
    Op,
    OpFlag,
    RingLayout,
    check_layout,
)
from vdev.plugins import Kind, PluginError, load
from vdev.virtio.chain import DescriptorChain
from vdev.virtio.errors import GuestMemoryError
from vdev.virtio.layout import U16, split_ring_sizes
from vdev.virtio.memory import GuestMemory
from vdev.virtio.split import SplitQueue

log = logging.getLogger(__name__)

#: Polling of idle rings before sleeping (see `AdaptivePoll`). Up to 1 ms: the next
#: request of a depth-1 stream comes a full front-end round trip later (two wake-ups
#: of ~50 us on these VMs), and a child asleep then costs a third. Measured (blkload,
#: 4 KiB QD1 through `map`): p50 75 us with 1 ms here and 100 us in the core, 274 us
#: with 100 us and 50 us; in-process 71 us.
POLL_GROW = 10e-6
POLL_MAX = 1e-3
#: Backend attributes the core needs to build the device, by backend kind.
BLK_ATTRIBUTES = (
    "size",
    "block_size",
    "read_only",
    "serial",
    "physical_block_size",
    "supports_discard",
    "supports_write_zeroes",
    "supports_resize",
    "max_concurrency",
)
NET_ATTRIBUTES = ("vnet_hdr", "offload_features")
_USED_IDX_OFFSET = 2
#: Open files a child may have: a guest memory table of vhost-user's 509 slots arrives
#: as 509 fds, which the child dups while mapping them.
FD_LIMIT = 4096


class _Work(Protocol):
    """What `_serve` runs: rings to drain, and the fds that wake it."""

    def drain(self) -> bool:
        """Process what the rings hold; True if there was anything."""

    def pending(self) -> bool:
        """Whether a ring holds something (polled while spinning)."""

    def arm(self) -> bool:
        """Ask for kicks again; True if work arrived meanwhile."""

    def dispatch(self, events: list[tuple[int, int]]) -> bool:
        """Act on the fds that woke us; False to stop serving."""


def _serve(
    work: _Work, poller: select.epoll, before_sleep: Callable[[], None] | None = None
) -> None:
    """Drain, poll briefly if that has been paying off, sleep on `poller`, dispatch."""
    poll = AdaptivePoll(POLL_GROW, POLL_MAX)
    while True:
        busy = work.drain()
        if not busy and poll.time:
            deadline = time.monotonic() + poll.time
            while not busy and time.monotonic() < deadline:
                busy = work.pending()
                os.sched_yield()  # lets the core run if it shares our CPU
        if not busy:
            busy = work.arm()
        if before_sleep is not None:
            before_sleep()
        started = time.monotonic()
        try:
            events = poller.poll(0 if busy else -1)
        except InterruptedError:
            continue
        if not busy:
            poll.update(time.monotonic() - started + poll.time)
        if not work.dispatch(events):
            return


class _Ring:
    """One channel ring as the child serves it."""

    def __init__(self, memory: GuestMemory, index: int, layout: RingLayout, fds: Sequence[int]):
        desc_len, avail_len, used_len = split_ring_sizes(layout.size)
        used = memory.gpa_view(CHANNEL_GPA + layout.used, used_len)
        # Start where the last child stopped: redo whatever it left unfinished.
        base = U16.unpack_from(used, _USED_IDX_OFFSET)[0]
        self.queue = SplitQueue(
            memory,
            index,
            layout.size,
            memory.gpa_view(CHANNEL_GPA + layout.desc, desc_len),
            memory.gpa_view(CHANNEL_GPA + layout.avail, avail_len),
            used,
            features=0,
            base=base,
        )
        self.kick_fd, self.call_fd = fds

    def notify(self) -> None:
        """Publish what was filled; signal the core if it asked for it."""
        self.queue.flush()
        if self.queue.should_notify():
            os.eventfd_write(self.call_fd, 1)


class _BlockRing(threading.Thread):
    """Block requests of one ring, in order, on a thread of its own: the rings of a
    backend that takes several calls at once (`max_concurrency`) run side by side."""

    def __init__(
        self, backend: BlockBackend, ring: _Ring, memory: GuestMemory, stop_fd: int
    ) -> None:
        super().__init__(name=f"ring {ring.queue.index}", daemon=True)
        self.backend = backend
        self.ring = ring
        self.memory = memory
        self.stop_fd = stop_fd

    def run(self) -> None:
        poller = select.epoll()
        poller.register(self.ring.kick_fd, select.EPOLLIN)
        poller.register(self.stop_fd, select.EPOLLIN)
        try:
            _serve(self, poller)
        except BaseException:
            # A ring we cannot serve is a dead child: the core starts another.
            log.exception("ring %d failed", self.ring.queue.index)
            os._exit(70)

    def drain(self) -> bool:
        """Run what the ring holds, in order; publish the results once."""
        queue = self.ring.queue
        queue.disable_kicks()
        chains = queue.pop_batch(queue.size)
        for chain in chains:
            self._execute(chain)
            queue.fill(chain, RESULT.size)
        self.ring.notify()
        if queue.failure is not None:
            raise queue.failure  # the core broke the ring protocol
        return bool(chains)

    def pending(self) -> bool:
        return self.ring.queue.has_available()

    def arm(self) -> bool:
        return self.ring.queue.enable_kicks()

    def dispatch(self, events: list[tuple[int, int]]) -> bool:
        for fd, _ in events:
            if fd == self.stop_fd:
                return False
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
        return True

    def _execute(self, chain: DescriptorChain) -> None:
        """Run one block request with the core's own dispatch; the status goes back."""
        header, data_out = chain.readable[0], chain.readable[1:]
        data_in, result = chain.writable[:-1], chain.writable[-1]
        kind, flags, segments, offset, length = REQUEST.unpack_from(header)
        try:
            data = self._segments(header[REQUEST.size :], segments) if segments else None
        except OSError as exc:
            log.warning("request at byte %d: %s", offset, exc)
            status = Status.IOERR
        else:
            if data is None:
                data = data_in if kind == RequestType.IN else data_out
            request = BlkRequest(kind, offset, data, length)
            if kind in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
                request.ranges = (Range(offset, length, bool(flags & OpFlag.UNMAP)),)
            status = execute(self.backend, request)
        RESULT.pack_into(result, 0, status, 0)

    def _segments(self, table: memoryview, count: int) -> list[memoryview]:
        """Views of the guest memory a request's segment table lists."""
        entries = table.cast("Q")
        if len(entries) < 2 * count:
            raise OSError(errno.EFAULT, f"a table of {len(entries) // 2} for {count} segments")
        gpa_view = self.memory.gpa_view
        try:
            # One region each: the core took every segment from a view of one region.
            return [gpa_view(entries[i], entries[i + 1]) for i in range(0, 2 * count, 2)]
        except GuestMemoryError as exc:
            raise OSError(errno.EFAULT, str(exc)) from None


class _NetService:
    """Frames: ring 0 carries the core's frames (and feature changes) to the backend;
    ring 1 holds the core's receive buffers, which frames from the backend fill."""

    def __init__(
        self, backend: NetBackend, rings: list[_Ring], control: Callable[[], bool]
    ) -> None:
        self.backend = backend
        self.tx, self.rx = rings
        self.control = control
        #: The backend's receive fds (one per queue pair of a multi-queue TAP) -> pair.
        self.fds: dict[int, int] = {}
        while (fd := backend.fileno(len(self.fds))) is not None and fd not in self.fds:
            self.fds[fd] = len(self.fds)
        self._control_fd = -1
        self._poller = select.epoll()
        self._fd_watched = False
        #: A receive buffer popped but not filled (the backend had no frame for it).
        self._spare: DescriptorChain | None = None
        self._rx_lock = threading.Lock()
        self._starved = False
        self.rx.queue.disable_kicks()
        backend.attach(self.deliver)

    def drain(self) -> bool:
        queue = self.tx.queue
        queue.disable_kicks()
        chains: list[DescriptorChain] = []
        frames: list[Sequence[memoryview]] = []
        while (chain := queue.pop()) is not None:
            chains.append(chain)
            op, _, _, arg, _ = REQUEST.unpack_from(chain.readable[0])
            if op == Op.TRANSMIT:
                frames.append(chain.readable[1:])
            elif op == Op.SET_FEATURES:
                self._call(self.backend.transmit, frames)  # those sent before the change
                frames = []
                self._call(self.backend.set_features, arg)
        if frames:
            self._call(self.backend.transmit, frames)
        for chain in chains:
            queue.fill(chain, 0)
        queue.flush()
        self.tx.notify()
        return bool(chains)

    @staticmethod
    def _call(method: Callable[[Any], object], arg: Any) -> None:
        try:
            method(arg)
        except OSError as exc:
            log.debug("transmit failed: %s", exc)
        except Exception:
            log.exception("net backend error")

    def pending(self) -> bool:
        return self.tx.queue.has_available()

    def arm(self) -> bool:
        return self.tx.queue.enable_kicks()

    def serve(self, control_fd: int) -> None:
        """Serve both rings, the backend fd and the control socket until told to stop."""
        self._control_fd = control_fd
        for fd in (control_fd, self.tx.kick_fd, self.rx.kick_fd):
            self._poller.register(fd, select.EPOLLIN)
        try:
            _serve(self, self._poller, self._watch_backend_fd)
        finally:
            self._poller.close()

    def dispatch(self, events: list[tuple[int, int]]) -> bool:
        for fd, _ in events:
            if fd == self._control_fd:
                if not self.control():
                    return False
            elif fd in self.fds:
                self.receive(self.fds[fd])
            else:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
                if fd == self.rx.kick_fd:
                    self.refill()
        return True

    def _watch_backend_fd(self) -> None:
        """Watch the backend fd only while there are buffers to fill."""
        wanted = bool(self.fds) and not self._starved
        if wanted != self._fd_watched:
            for fd in self.fds:
                if wanted:
                    self._poller.register(fd, select.EPOLLIN)
                else:
                    self._poller.unregister(fd)
            self._fd_watched = wanted

    def refill(self) -> None:
        """The core kicked the receive ring: it posted buffers."""
        with self._rx_lock:
            self.rx.queue.disable_kicks()
            self._starved = False

    def _buffer(self) -> DescriptorChain | None:
        chain, self._spare = self._spare, None
        if chain is None:
            chain = self.rx.queue.pop()
            if chain is None and self.rx.queue.enable_kicks():
                self.rx.queue.disable_kicks()
                chain = self.rx.queue.pop()
            if chain is None:
                self._starved = True
        return chain

    def receive(self, pair: int) -> None:
        """Read frames from a backend fd into receive buffers until it has none."""
        with self._rx_lock:
            received = False
            while (chain := self._buffer()) is not None:
                try:
                    n = self.backend.receive_into(chain.writable, pair)
                except BlockingIOError:
                    self._spare = chain
                    break
                except OSError as exc:
                    log.error("backend receive failed: %s", exc)
                    self._spare = chain
                    break
                self.rx.queue.push(chain, n)
                received = True
            if received:
                self.rx.notify()

    def deliver(self, frame: bytes | memoryview) -> bool:
        """The backend's DeliverFn: one frame into a receive buffer (any thread)."""
        with self._rx_lock:
            chain = self._buffer()
            if chain is None or chain.write_into(frame) < len(frame):
                self._spare = chain  # no buffer, or a frame too large: dropped
                return False
            self.rx.queue.push(chain, len(frame))
            self.rx.notify()
            return True


class Domain:
    """A started child: its backend (built and confined), then its rings."""

    def __init__(self, sock: socket.socket, message: dict[str, Any]) -> None:
        self.sock = sock
        self.kind = Kind(message["kind"])
        if message.get("netns"):
            confine.enter_netns(message["netns"])
        cls = load(self.kind, message["backend"])
        self.backend: Any = cls(**message["options"])
        self.attributes = self._attributes()
        user = message.get("user")
        if user:
            confine.drop_user(user)
        confine.no_new_privs()
        if message.get("seccomp", True):
            if confine.seccomp_available():
                confine.apply_seccomp(sockets=self.kind != Kind.BLK_BACKEND)
            else:
                log.warning("seccomp filter not applied: libseccomp is not installed")
        #: The channel, at CHANNEL_GPA; guest memory (policy map), at its guest addresses.
        self.channel = GuestMemory()
        self.memory = GuestMemory()
        self.rings: list[_Ring] = []
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)

    def _attributes(self) -> dict[str, object]:
        wanted = NET_ATTRIBUTES if self.kind == Kind.NET_BACKEND else BLK_ATTRIBUTES
        return {name: getattr(self.backend, name) for name in wanted if hasattr(self.backend, name)}

    def attach_channel(self, message: dict[str, Any], fds: Sequence[int]) -> None:
        """Map the channel and restore the state, from the core's `serve` message: fds
        are the memfd, then a kick and a call eventfd per ring."""
        layouts = [RingLayout.from_wire(r) for r in message["layout"]]
        if len(fds) != 1 + 2 * len(layouts):
            raise ValueError(f"{len(fds)} fds for a channel of {len(layouts)} rings")
        memfd, ring_fds = fds[0], fds[1:]
        size = os.fstat(memfd).st_size
        check_layout(layouts, size)
        self.channel.add_region(CHANNEL_GPA, size, CHANNEL_GPA, 0, memfd)
        self.rings = [
            _Ring(self.channel, i, layout, [os.dup(fd) for fd in ring_fds[2 * i : 2 * i + 2]])
            for i, layout in enumerate(layouts)
        ]
        state = message.get("state", {})
        features = state.get("features")
        if features is not None and isinstance(self.backend, NetBackend):
            self.backend.set_features(int(features))
        size = state.get("size")
        if size is not None and size != getattr(self.backend, "size", size):
            answer = self.resize(size)
            if answer["op"] != "ok":
                raise ValueError(f"cannot restore the disk size {size}: {answer['message']}")

    def set_memory(self, regions: Sequence[Sequence[int]], fds: Sequence[int]) -> None:
        """Replace the guest regions (policy map) with those of the core's table; a
        table that cannot be mapped leaves none."""
        self.memory.clear()
        if len(regions) != len(fds):
            raise ValueError(f"{len(fds)} fds for {len(regions)} regions")
        try:
            for (gpa, size, user_addr, offset), fd in zip(regions, fds, strict=True):
                self.memory.add_region(gpa, size, user_addr, offset, fd)
        except BaseException:
            self.memory.clear()
            raise

    def control(self, timeout: float | None = 0) -> bool:
        """Handle one control message; False when the child must stop."""
        try:
            message, fds = control.receive(self.sock, timeout)
        except control.ControlError as exc:
            log.info("control socket: %s; stopping", exc)
            return False
        try:
            match message["op"]:
                case "stop":
                    return False
                case "ping":
                    control.send(self.sock, {"op": "pong"})
                case "memory":
                    control.send(self.sock, self.map_memory(message, fds))
                case "resize":
                    control.send(self.sock, self.resize(message.get("size")))
                case op:
                    log.error("unknown control message %r", op)
            return True
        except control.ControlError as exc:
            log.info("control socket: %s; stopping", exc)
            return False
        finally:
            control.close_fds(fds)

    def resize(self, size: object) -> dict[str, Any]:
        """Resize the block backend (a `resize` message); the answer."""
        backend = self.backend
        if not (isinstance(backend, BlockBackend) and backend.supports_resize):
            return {"op": "error", "message": f"a {type(backend).__name__} cannot be resized"}
        if not isinstance(size, int):
            return {"op": "error", "message": f"bad size {size!r}"}
        try:
            backend.resize(size)
        except (OSError, BackendError) as exc:
            return {"op": "error", "message": str(exc)}
        return {"op": "ok"}

    def map_memory(self, message: dict[str, Any], fds: Sequence[int]) -> dict[str, Any]:
        """Map the table of a `memory` message; the answer (the child serves on, with
        no guest memory, if the table cannot be mapped)."""
        try:
            self.set_memory(message["regions"], fds)
        except (GuestMemoryError, ValueError, KeyError, TypeError) as exc:
            log.error("guest memory table refused: %s", exc)
            return {"op": "error", "message": str(exc)}
        return {"op": "ok"}

    def run(self) -> None:
        """Serve the rings until told to stop (or the core goes away)."""
        if isinstance(self.backend, NetBackend):
            _NetService(self.backend, self.rings, self.control).serve(self.sock.fileno())
            return
        workers = [_BlockRing(self.backend, ring, self.memory, self._stop) for ring in self.rings]
        for worker in workers:
            worker.start()
        while self.control(None):
            pass
        os.eventfd_write(self._stop, 1)
        for worker in workers:
            worker.join()

    def close(self) -> None:
        try:
            self.backend.close()
        except Exception:
            log.exception("closing the backend")


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_LIMIT if hard == resource.RLIM_INFINITY else min(FD_LIMIT, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s domain[%(process)d] %(name)s: %(message)s",
    )


def _attach(domain: Domain) -> None:
    """Map the guest memory table, if one comes first, then the channel (`serve`):
    the rings start with the guest memory their requests refer to."""
    while True:
        message, fds = control.receive(domain.sock)
        try:
            if message["op"] == "serve":
                domain.attach_channel(message, fds)
                return
            if message["op"] != "memory":
                raise control.ControlError(f"expected 'serve', got {message['op']!r}")
            control.send(domain.sock, domain.map_memory(message, fds))
        finally:
            control.close_fds(fds)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    # Ctrl-C on the terminal is for the core, which stops us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _setup_logging()
    _raise_fd_limit()
    sock = socket.socket(fileno=int(argv[1]))
    try:
        message, fds = control.receive(sock)
        control.close_fds(fds)
    except control.ControlError as exc:
        log.error("no start message: %s", exc)
        return 2
    level = message.get("log_level")
    if isinstance(level, int):
        logging.getLogger().setLevel(level)
    try:
        domain = Domain(sock, message)
    except (BackendError, PluginError, confine.ConfineError, ValueError, TypeError) as exc:
        control.send(sock, {"op": "error", "message": str(exc)})
        return 1
    except Exception as exc:
        log.exception("cannot start")
        control.send(sock, {"op": "error", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    control.send(sock, {"op": "ready", "attributes": domain.attributes})
    try:
        _attach(domain)
    except (
        control.ControlError,
        GuestMemoryError,
        ValueError,
        TypeError,
        KeyError,
        OSError,
    ) as exc:
        log.error("cannot start serving: %s", exc)
        domain.close()
        return 1
    control.send(sock, {"op": "ok"})
    try:
        domain.run()
    finally:
        domain.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
