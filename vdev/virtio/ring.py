"""The device side of a virtqueue: the interface both ring layouts implement.

Typical worker loop (libvhost-user style)::

    queue.disable_kicks()
    while True:
        while (chain := queue.pop()) is not None:
            ...
            queue.push(chain, written)
        if queue.should_notify():
            signal_call_eventfd()
        if not queue.enable_kicks():
            break              # sleep on the kick eventfd
        queue.disable_kicks()  # buffers arrived meanwhile: drain again

A queue is used by one thread at a time. Anything wrong in what the driver wrote makes
`pop` raise `DescriptorError` and breaks that queue only.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from vdev.virtio.chain import DescriptorChain
from vdev.virtio.errors import DescriptorError, GuestMemoryError, VirtioError
from vdev.virtio.features import VirtioFeature
from vdev.virtio.layout import DESC_SIZE, F_INDIRECT, F_NEXT, F_WRITE, Fence
from vdev.virtio.memory import GuestMemory

logger = logging.getLogger(__name__)


class Virtqueue(ABC):
    """One virtqueue over guest memory (split or packed)."""

    def __init__(self, mem: GuestMemory, index: int, size: int, features: int) -> None:
        self.index = index
        self.size = size
        #: Set once the driver put a malformed chain on the queue; `pop` then yields None.
        self.broken = False
        self._mem = mem
        self._event_idx = bool(features & VirtioFeature.RING_EVENT_IDX)
        self._indirect = bool(features & VirtioFeature.RING_INDIRECT_DESC)
        self._fence = Fence()
        self._in_flight: set[int] = set()
        self._kicks_enabled = True
        #: Chains pushed since the last `should_notify`.
        self._pushed = 0

    def __repr__(self) -> str:
        state = "broken" if self.broken else f"{len(self._in_flight)} in flight"
        return f"<{type(self).__name__} {self.index} size {self.size}, {state}>"

    @property
    def in_flight(self) -> int:
        """Chains popped and not pushed yet."""
        return len(self._in_flight)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None.

        Raises `DescriptorError` if the driver's chain is malformed; the queue is then
        broken and returns None forever.
        """
        if self.broken:
            return None
        try:
            chain = self._pop()
            if chain is not None and chain.head in self._in_flight:
                raise self._error(f"buffer {chain.head} made available while in flight")
        except DescriptorError as exc:
            self.broken = True
            logger.debug("%r: %s", self, exc)
            raise
        if chain is not None:
            self._in_flight.add(chain.head)
        return chain

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return `chain` to the driver with `written` bytes stored in its writable part.

        Chains may be pushed in any order. Call `should_notify` after a batch.
        """
        if chain.head not in self._in_flight:
            raise ValueError(f"{self!r}: chain {chain.head} is not in flight")
        if not 0 <= written <= chain.writable_len:
            raise ValueError(
                f"{self!r}: {written} bytes written into {chain.writable_len} writable"
            )
        self._in_flight.remove(chain.head)
        self._push(chain, written)
        self._pushed += 1

    def should_notify(self) -> bool:
        """True if the driver wants an interrupt for what was pushed since the last call."""
        if not self._pushed:
            return False
        self._fence()  # our used entries must be visible before we read the driver's wish
        pushed, self._pushed = self._pushed, 0
        return self._need_notify(pushed)

    def disable_kicks(self) -> None:
        """Ask the driver not to notify us of new buffers (we are draining the ring)."""
        self._kicks_enabled = False
        self._set_kicks(False)

    def enable_kicks(self) -> bool:
        """Ask for notifications again; True if buffers arrived meanwhile (drain again)."""
        self._kicks_enabled = True
        self._set_kicks(True)
        self._fence()  # publish the request before looking at the ring again
        return self.has_available()

    @abstractmethod
    def has_available(self) -> bool:
        """True if the driver has made a chain available that `pop` has not taken."""

    @abstractmethod
    def get_base(self) -> int:
        """The ring position to report in GET_VRING_BASE."""

    @abstractmethod
    def _pop(self) -> DescriptorChain | None: ...

    @abstractmethod
    def _push(self, chain: DescriptorChain, written: int) -> None: ...

    @abstractmethod
    def _need_notify(self, pushed: int) -> bool: ...

    @abstractmethod
    def _set_kicks(self, enabled: bool) -> None: ...

    # --- helpers for reading chains ----------------------------------------------------

    def _error(self, message: str) -> DescriptorError:
        return DescriptorError(f"queue {self.index}: {message}")

    def _add_buffer(self, chain: DescriptorChain, addr: int, length: int, flags: int) -> None:
        """Append a direct descriptor's buffer to `chain`, bounds-checked."""
        if flags & F_WRITE:
            target = chain.writable
        elif chain.writable:
            raise self._error("device-readable descriptor after a device-writable one")
        else:
            target = chain.readable
        try:
            target.extend(self._mem.gpa_views(addr, length))
        except GuestMemoryError as exc:
            raise self._error(f"descriptor buffer: {exc}") from exc

    def _indirect_table(self, addr: int, length: int, flags: int, first: bool) -> bytes:
        """Validate an INDIRECT descriptor and return a copy of the table it points to."""
        if not self._indirect:
            raise self._error("indirect descriptor but RING_INDIRECT_DESC was not negotiated")
        if flags & F_NEXT or not first:
            raise self._error("an indirect descriptor must be alone in its chain")
        if length == 0 or length % DESC_SIZE:
            raise self._error(f"indirect table length {length} is not a positive multiple of 16")
        if length // DESC_SIZE > self.size:
            raise self._error(
                f"indirect table of {length // DESC_SIZE} descriptors exceeds the queue size"
            )
        try:
            return b"".join(self._mem.gpa_views(addr, length))
        except GuestMemoryError as exc:
            raise self._error(f"indirect table: {exc}") from exc

    def _check_indirect_entry(self, flags: int) -> None:
        if flags & F_INDIRECT:
            raise self._error("indirect descriptor inside an indirect table")

    @staticmethod
    def _check_area(name: str, view: memoryview, needed: int) -> None:
        if view.nbytes < needed:
            raise VirtioError(f"{name} area of {view.nbytes} bytes, {needed} needed")
