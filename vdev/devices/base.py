"""The device-model contract: what a virtio device served by vdev looks like.

This is also the raw-device plugin contract: subclass `Device`, set `device_id`, and
implement `handle`. The server negotiates features, maps memory and hands each enabled
queue to a worker thread (`vdev.worker`); the worker calls `handle(queue)` whenever the
queue may have work. The queue has the libvhost-user calls: `pop_batch` / `pop` (take
chains), `fill` / `push` (complete one), `notify` (publish and interrupt the driver if
it asked for it). Handlers run on the worker thread, never on the event loop: they may
block on I/O, and they must not call trio.

Exports: `Device` (the base class), `Queue` (what `handle` is given), `DescriptorChain`
(what a queue pops: `readable` / `writable` views into guest memory, `read_all`,
`write_into`), `DeviceError` (a request the device refuses).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar, Protocol

from vdev.virtio.chain import DescriptorChain
from vdev.virtio.memory import GuestMemory

__all__ = ["DescriptorChain", "Device", "DeviceError", "Queue"]

log = logging.getLogger(__name__)


class DeviceError(Exception):
    """A request the device cannot honour (bad config write, unsupported message)."""


class Queue(Protocol):
    """One virtqueue as a device sees it (implemented by `vdev.vring.Vring`)."""

    index: int
    #: Entries of the ring (what the driver set with SET_VRING_NUM).
    size: int
    #: Counters the device keeps for this queue (requests, bytes, ...).
    counters: dict[str, int]

    def pop_batch(self, limit: int) -> list[DescriptorChain]:
        """Up to `limit` available chains (none once the queue is broken)."""

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None (also None once the queue is broken)."""

    def fill(self, chain: DescriptorChain, written: int) -> None:
        """Complete `chain` (`written` bytes stored), visible to the driver at `flush`."""

    def flush(self) -> None:
        """Publish every completion filled so far."""

    def push(self, chain: DescriptorChain, written: int) -> None:
        """`fill` and `flush` one chain."""

    def notify(self) -> None:
        """Publish, and interrupt the driver if it wants an interrupt for it."""

    def wake(self) -> None:
        """Have the worker call the handler soon (safe from any thread)."""


class Device:
    """A virtio device. Subclasses set `device_id` and implement `handle`."""

    #: Virtio device id (1 net, 2 block, ...).
    device_id: ClassVar[int]
    #: Extra vhost-user protocol feature bits this device needs (e.g. RARP).
    protocol_features: ClassVar[int] = 0

    def __init__(self, *, num_queues: int = 1, max_queue_size: int = 1024) -> None:
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        #: Worker threads serving the queues. One by default: Python threads share one
        #: interpreter lock, and two CPU-bound workers lose to one serving both (2 queues
        #: at QD16 each: 62k IOPS on two threads, 67-79k on one, 65-72k for 1 queue at
        #: QD32). More pay off when the backend waits outside the lock.
        self.queue_threads = 1
        self.acked_features = 0

    def features(self) -> int:
        """Device-specific feature bits offered (the server adds the transport ones)."""
        return 0

    def config(self) -> bytes:
        """The device configuration space, as the driver reads it."""
        return b""

    @property
    def config_space(self) -> bool:
        """Whether the front-end reads the config space over vhost-user (protocol
        feature CONFIG): by default when the device has one (overrides `config`). QEMU
        does for blk; for net it does not, so NetDevice says False unless told."""
        return type(self).config is not Device.config

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote `data` at `offset` of the configuration space."""
        raise DeviceError("the configuration space is read-only")

    def set_features(self, features: int) -> None:
        """The features the driver accepted (transport bits included)."""
        self.acked_features = features

    # --- the data plane (called on the queue's worker thread) ---------------------------

    def queue_group(self, index: int) -> int:
        """Queues of one group share a worker thread: queue `index` goes to thread
        ``index % queue_threads`` (a net device gives each queue pair its own)."""
        return index % self.queue_threads

    def start_queue(self, queue: Queue) -> None:
        """`queue` is about to be served (on its worker thread)."""

    def handle(self, queue: Queue) -> None:
        """Process the available chains of `queue` (pop, fill, notify)."""
        raise NotImplementedError

    def has_work(self, queue: Queue) -> bool:
        """Work the device has for `queue` without a kick (completions, frames queued)."""
        return False

    def wait_fds(self, queue: Queue) -> Sequence[int]:
        """Fds whose readability means work for `queue` (a TAP, completions)."""
        return ()

    def stop_queue(self, queue: Queue) -> None:
        """`queue` stops being served: complete what it has in flight."""

    async def handle_message(self, request: int, payload: object) -> object:
        """A device-specific vhost-user request (SEND_RARP, NET_SET_MTU, ...)."""
        raise DeviceError(f"request {request} is not supported by this device")

    def memory_changed(self, memory: GuestMemory) -> None:
        """Guest memory was mapped or remapped (SET_MEM_TABLE, ADD/REM_MEM_REG).

        Called in a thread of its own, with the queues that use the memory stopped: it
        may block (a driver-domain child maps the same memory) without stalling the
        event loop.

        Devices normally need not care: chains carry views into the new memory. The
        default passes the news on to a backend that asks for it (a driver-domain proxy
        maps the same memory in its child).
        """
        hook = getattr(getattr(self, "backend", None), "memory_changed", None)
        if hook is not None:
            hook(memory)

    def reset(self) -> None:
        """The front-end went away or reset the device: forget negotiated state."""
        self.acked_features = 0

    def stats(self) -> dict[str, int]:
        """Counters for `vdev demo`, `vdev ctl stats` and benchmarks (requests, bytes,
        errors, ...). Called from the event loop while workers count: read counters
        whose keys are all there already (a dict growing meanwhile breaks iteration)."""
        return {}

    def queue_stats(self, index: int) -> dict[str, int]:
        """Counters of queue `index` since the device started (requests, bytes, ...),
        for `vdev ctl stats`; the same rules as `stats`."""
        return {}

    def close(self) -> None:
        """Release the device's resources; called once when the daemon stops."""
