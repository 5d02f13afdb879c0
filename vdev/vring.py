"""One virtqueue as the server holds it: its vhost-user state and its worker.

A `Vring` collects what the front-end tells it (size, addresses, base, kick/call/err
eventfds, enable), builds the ring over guest memory once everything is there, and
hands it to the worker thread of its queue group (`vdev.worker`). It is also the
`Queue` a device sees on that thread: `pop_batch` / `pop`, `fill` / `push`, `flush`,
`notify`, `wake`.
"""

from __future__ import annotations

import contextlib
import logging
import os

import trio

from vdev.protocol import VringAddress
from vdev.protocol.constants import VHOST_VRING_F_LOG
from vdev.virtio.chain import DescriptorChain
from vdev.virtio.dirtylog import DirtyLog
from vdev.virtio.features import VirtioFeature
from vdev.virtio.memory import GuestMemory
from vdev.virtio.queue import Virtqueue, initial_base, make_queue
from vdev.worker import QueueWorker, QueueWorkers

log = logging.getLogger(__name__)


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
        #: The guest memory the ring lives in (checked for faults after each batch).
        self.memory: GuestMemory | None = None
        #: Why the queue stopped serving (a hostile chain, a device fault), if it did.
        self.failure: str | None = None
        #: Kick eventfd reads, call eventfd signals, and adaptive spins that found work
        #: on this ring: plain ints bumped on the worker thread, read by the control
        #: socket without a lock (a benign race: a read may miss the latest bump).
        self.kicks = 0
        self.notifies = 0
        self.polls = 0
        #: Requests a predecessor left in flight that this session re-submitted.
        self.resubmitted = 0
        #: The dirty log the ring marks, while the front-end migrates (`set_log`).
        self.log: DirtyLog | None = None
        self._worker: QueueWorker | None = None

    # --- control (called by the server) -------------------------------------------

    @property
    def running(self) -> bool:
        return self._worker is not None

    @property
    def ready(self) -> bool:
        return self.started and self.enabled and self.size > 0 and self.address is not None

    @property
    def active(self) -> bool:
        """The ring is built and has not failed (what the worker serves)."""
        return self.ring is not None and self.failure is None

    async def start(
        self,
        workers: QueueWorkers,
        memory: GuestMemory,
        features: int,
        inflight: memoryview | None = None,
    ) -> None:
        """Build the ring over `memory` (tracking requests in `inflight`, the queue's
        region of an INFLIGHT_SHMFD buffer, if given) and hand it to its group's worker."""
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
            inflight=inflight,
        )
        if self.ring.recovered:
            log.info(
                "queue %d: re-submitting %d requests left in flight by the previous back-end",
                self.index,
                self.ring.recovered,
            )
            self.resubmitted += self.ring.recovered
        self.failure = None
        self.memory = memory
        self._apply_log()
        self._worker = await workers.get(self.index)
        self._worker.attach(self)
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
        """Stop serving, letting requests in flight complete; remember the base."""
        if self._worker is not None:
            await self._worker.detach(self)
            self._worker = None
        if self.ring is not None:
            self.base = self.ring.get_base()
            self.ring = None

    def set_log(self, dirty: DirtyLog | None) -> None:
        """Mark the device's writes in `dirty` (None: stop), the ring's own stores too
        when SET_VRING_ADDR asked for it (VHOST_VRING_F_LOG); takes effect at once on a
        running ring. VirtioError if the log does not cover the ring (nothing changes)."""
        previous, self.log = self.log, dirty
        try:
            self._apply_log()
        except BaseException:
            self.log = previous
            raise

    def _apply_log(self) -> None:
        ring, dirty, address = self.ring, self.log, self.address
        if ring is None or address is None:
            return
        if dirty is None or not address.flags & VHOST_VRING_F_LOG:
            ring.set_log(dirty)
            return
        assert self.memory is not None
        desc = self.memory.user_to_gpa(address.desc_user_addr)
        ring.set_log(dirty, desc, address.log_guest_addr)

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

    # --- the Queue a device sees (on the worker thread) -----------------------------

    def pop_batch(self, limit: int) -> list[DescriptorChain]:
        """Up to `limit` available chains (none once the queue failed)."""
        ring = self.ring
        if ring is None or self.failure is not None:
            return []
        return ring.pop_batch(limit)

    def pop(self) -> DescriptorChain | None:
        chains = self.pop_batch(1)
        return chains[0] if chains else None

    def fill(self, chain: DescriptorChain, written: int) -> None:
        assert self.ring is not None
        self.ring.fill(chain, written)

    def flush(self) -> None:
        if self.ring is not None:
            self.ring.flush()

    def push(self, chain: DescriptorChain, written: int) -> None:
        assert self.ring is not None
        self.ring.push(chain, written)

    def notify(self) -> None:
        """Publish what was filled and interrupt the driver if it asked for it."""
        ring = self.ring
        if ring is not None:
            ring.flush()
            if ring.should_notify():
                self.notifies += 1
                self._signal(self.call_fd)

    @property
    def idle(self) -> bool:
        """No worker, or its thread is asleep (for tests that wait for quiet)."""
        return self._worker is None or self._worker.idle

    def wake(self) -> None:
        """Have the worker look at this queue soon (from any thread)."""
        if self._worker is not None:
            self._worker.wake()

    def fail(self, message: str) -> None:
        """Stop serving this queue (until the device is reset) and tell the front-end."""
        if self.failure is not None:
            return
        self.failure = message
        log.error("queue %d: %s; queue stopped until the device is reset", self.index, message)
        self._signal(self.err_fd)

    @staticmethod
    def _signal(fd: int | None) -> None:
        if fd is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.eventfd_write(fd, 1)
