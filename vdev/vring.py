"""One virtqueue as the server holds it: its vhost-user state and its worker task.

A `Vring` collects what the front-end tells it (size, addresses, base, kick/call/err
eventfds, enable), builds the ring over guest memory once everything is there, and
runs the device's `run_queue` in a task of its own. It is also the `Queue` a device
sees: `pop`, `push`, `notify`, `wait_kick`, `serve`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

import trio

from vdev.devices.base import Device
from vdev.protocol import VringAddress
from vdev.virtio.chain import DescriptorChain
from vdev.virtio.errors import VirtioError
from vdev.virtio.features import VirtioFeature
from vdev.virtio.memory import GuestMemory
from vdev.virtio.queue import Virtqueue, initial_base, make_queue

log = logging.getLogger(__name__)

#: How long a worker keeps polling an idle ring before sleeping on the kick eventfd
#: (adaptive polling: a kick and an interrupt cost far more than a short spin).
POLL_SECONDS = 50e-6


def close_fd(fd: int | None) -> None:
    """Close an fd that trio may be waiting on."""
    if fd is not None:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)


class Vring:
    """State and worker of one virtqueue of one device session."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.size = 0
        self.address: VringAddress | None = None
        #: SET_VRING_BASE value; None: the ring's initial state.
        self.base: int | None = None
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        #: SET_VRING_KICK received (with an fd or the no-fd bit).
        self.started = False
        self.enabled = False
        self.ring: Virtqueue | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._stopped.set()

    # --- control (called by the server) -------------------------------------------

    @property
    def running(self) -> bool:
        return self._scope is not None

    @property
    def ready(self) -> bool:
        return self.started and self.enabled and self.size > 0 and self.address is not None

    async def start(
        self, nursery: trio.Nursery, device: Device, memory: GuestMemory, features: int
    ) -> None:
        """Build the ring over `memory` and start the device's worker for it."""
        assert self.address is not None and not self.running
        self.ring = make_queue(
            memory,
            self.index,
            self.size,
            self.address.desc_user_addr,
            self.address.avail_user_addr,
            self.address.used_user_addr,
            features=features,
            base=self._ring_base(features),
        )
        await nursery.start(self._work, device)
        log.debug("queue %d started (size %d)", self.index, self.size)

    def _ring_base(self, features: int) -> int:
        """SET_VRING_BASE as the ring understands it.

        For a packed ring the value carries the next avail position and wrap counter in
        bits 0-15 and the next used ones in bits 16-31 (QEMU's encoding); DPDK's
        virtio-user sends the avail half only. Nothing is in flight at a (re)start, so
        a missing used half is the avail half.
        """
        if self.base is None:
            return initial_base(features)
        if features & VirtioFeature.RING_PACKED and not self.base >> 16:
            return self.base | self.base << 16
        return self.base

    async def stop(self) -> None:
        """Stop the worker, letting requests in flight complete; remember the base."""
        if self._scope is not None:
            self._scope.cancel()
            await self._stopped.wait()
        if self.ring is not None:
            self.base = self.ring.get_base()
            self.ring = None

    def set_kick(self, fd: int | None) -> None:
        close_fd(self.kick_fd)
        self.kick_fd = fd

    def set_call(self, fd: int | None) -> None:
        close_fd(self.call_fd)
        self.call_fd = fd

    def set_err(self, fd: int | None) -> None:
        close_fd(self.err_fd)
        self.err_fd = fd

    def close(self) -> None:
        """Forget everything (the worker must be stopped)."""
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            close_fd(fd)
        self.__init__(self.index)  # type: ignore[misc]

    async def _work(
        self, device: Device, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._stopped = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                task_status.started()
                await device.run_queue(self)
        except VirtioError as exc:
            self.fail(str(exc))
        except Exception:
            log.exception("queue %d: device worker crashed; queue stopped", self.index)
            self._signal(self.err_fd)
        finally:
            self._scope = None
            self._stopped.set()

    # --- the Queue a device sees ---------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        ring = self.ring
        if ring is None:
            return None
        try:
            return ring.pop()
        except VirtioError as exc:  # DescriptorError included
            self.fail(str(exc))
            return None

    def push(self, chain: DescriptorChain, written: int) -> None:
        assert self.ring is not None
        self.ring.push(chain, written)

    def notify(self) -> None:
        if self.ring is not None and self.ring.should_notify():
            self._signal(self.call_fd)

    async def wait_kick(self) -> None:
        """Sleep until the driver kicks (or, with no kick fd, poll the ring).

        Kicks are re-enabled first; if buffers arrived meanwhile, return at once.
        """
        if self.ring is not None and self.ring.enable_kicks():
            return
        fd = self.kick_fd
        if fd is None:
            while self.ring is not None and not self.ring.has_available():
                await trio.sleep(0.001)
            return
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                os.eventfd_read(fd)
                return
            except BlockingIOError:
                continue

    async def serve(self, handler: Callable[[Vring], Awaitable[None] | None]) -> None:
        """Run `handler` whenever buffers may be available, until cancelled.

        Kicks are suppressed while the handler drains the ring; the handler itself is
        shielded so that a stop waits for the requests it has taken.
        """
        while self.ring is not None and not self.ring.broken:
            await self.wait_kick()
            while self.ring is not None and not self.ring.broken:
                self.ring.disable_kicks()
                with trio.CancelScope(shield=True):
                    result = handler(self)
                    if result is not None:
                        await result
                if not self.ring.enable_kicks() and not await self._poll():
                    break

    async def _poll(self) -> bool:
        """Spin briefly for new buffers before going back to sleep on the eventfd."""
        deadline = trio.current_time() + POLL_SECONDS
        while trio.current_time() < deadline:
            if self.ring is None or self.ring.has_available():
                return True
            await trio.lowlevel.checkpoint()
        return False

    def fail(self, message: str) -> None:
        """Report that this queue stopped for good (until reset), on its err eventfd too."""
        log.error("queue %d: %s; queue stopped until the device is reset", self.index, message)
        self._signal(self.err_fd)

    @staticmethod
    def _signal(fd: int | None) -> None:
        if fd is not None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(fd, 1)
