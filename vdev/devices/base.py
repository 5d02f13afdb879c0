"""The device-model contract: what a virtio device served by vdev looks like.

This is also the raw-device plugin contract: subclass `Device`, set `device_id`, and
implement `handle` (or `run_queue` for full control). The server negotiates features,
maps memory and starts one `run_queue` task per enabled queue; the queue object it
passes has `pop`, `push`, `notify` (the libvhost-user trio: take a chain, complete it,
interrupt the driver if it asked for it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import ClassVar, Protocol

from vdev.virtio.chain import DescriptorChain
from vdev.virtio.memory import GuestMemory

log = logging.getLogger(__name__)


class DeviceError(Exception):
    """A request the device cannot honour (bad config write, unsupported message)."""


class Queue(Protocol):
    """One virtqueue as a device sees it (implemented by `vdev.vring.Vring`)."""

    index: int

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None (also None once the queue is broken)."""

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Complete `chain`, reporting `written` bytes stored in its writable buffers."""

    def notify(self) -> None:
        """Interrupt the driver if it wants an interrupt for what was pushed."""

    async def wait_kick(self) -> None:
        """Sleep until the driver signals new buffers."""

    async def serve(self, handler: Callable[[Queue], Awaitable[None] | None]) -> None:
        """Call `handler` whenever buffers may be available, until cancelled."""


class Device:
    """A virtio device. Subclasses set `device_id` and implement `handle`."""

    #: Virtio device id (1 net, 2 block, ...).
    device_id: ClassVar[int]
    #: Extra vhost-user protocol feature bits this device needs (e.g. RARP).
    protocol_features: ClassVar[int] = 0
    #: Whether the front-end reads the config space over vhost-user (protocol feature
    #: CONFIG): QEMU does for blk, not for net (it warns when CONFIG is offered).
    config_space: ClassVar[bool] = True

    def __init__(self, *, num_queues: int = 1, max_queue_size: int = 1024) -> None:
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.acked_features = 0

    def features(self) -> int:
        """Device-specific feature bits offered (the server adds the transport ones)."""
        return 0

    def config(self) -> bytes:
        """The device configuration space, as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote `data` at `offset` of the configuration space."""
        raise DeviceError("the configuration space is read-only")

    def set_features(self, features: int) -> None:
        """The features the driver accepted (transport bits included)."""
        self.acked_features = features

    async def run_queue(self, queue: Queue) -> None:
        """Serve one enabled queue until cancelled. Default: `handle` on every kick."""
        await queue.serve(self.handle)

    def handle(self, queue: Queue) -> Awaitable[None] | None:
        """Process the available chains of `queue` (pop, push, notify)."""
        raise NotImplementedError

    async def handle_message(self, request: int, payload: object) -> object:
        """A device-specific vhost-user request (SEND_RARP, NET_SET_MTU, ...)."""
        raise DeviceError(f"request {request} is not supported by this device")

    def memory_changed(self, memory: GuestMemory) -> None:
        """Guest memory was mapped or remapped (SET_MEM_TABLE, ADD/REM_MEM_REG).

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
        """Counters for `vdev demo` and benchmarks (requests, bytes, ...)."""
        return {}

    def close(self) -> None:
        """Release the device's resources; called once when the daemon stops."""
