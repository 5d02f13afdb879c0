"""The device side of a virtqueue: the interface both ring layouts implement.

The API is batch-shaped, as libvhost-user's (pop / fill / flush / notify)::

    queue.disable_kicks()
    while True:
        chains = queue.pop_batch(64)
        for chain in chains:
            ...
            queue.fill(chain, written)   # the used entry, not yet visible
        queue.flush()                    # publish every filled entry at once
        if queue.should_notify():
            signal_call_eventfd()
        if not chains and not queue.enable_kicks():
            break              # sleep on the kick eventfd
        queue.disable_kicks()  # buffers arrived meanwhile: drain again

`push` is `fill` then `flush`. A queue is used by one thread at a time. Anything wrong
in what the driver wrote breaks that queue only: `pop` raises `DescriptorError`,
`pop_batch` returns the good chains before the bad one and leaves the error in
`failure`.

With an in-flight region (`vdev.virtio.inflight`) the queue records each chain it hands
out until its used entry is published, and after a crash of the previous owner hands
out the recorded ones again, first and in their original order.

With a dirty log (`set_log`, during a live migration) the queue marks every page the
device wrote: the first `written` bytes of each filled chain's writable buffers, and,
if asked, its own stores into the ring (used entries and index, suppression fields).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from vdev.virtio.chain import DescriptorChain
from vdev.virtio.errors import DescriptorError, GuestMemoryError, VirtioError
from vdev.virtio.features import VirtioFeature
from vdev.virtio.layout import DESC_SIZE, F_INDIRECT, F_NEXT, F_WRITE, Fence
from vdev.virtio.memory import GuestMemory

if TYPE_CHECKING:
    from vdev.virtio.dirtylog import DirtyLog
    from vdev.virtio.inflight import PackedInflight, SplitInflight

logger = logging.getLogger(__name__)

#: Longest indirect table accepted on any queue, whatever its size. The spec bounds a
#: table by what the device handles, not by the queue size: virtio-blk offers
#: `seg_max` 126 (header and status make 128), and Linux builds tables that long even
#: on a 64-entry queue.
MIN_INDIRECT_LIMIT = 128


class Virtqueue(ABC):
    """One virtqueue over guest memory (split or packed)."""

    def __init__(
        self,
        mem: GuestMemory,
        index: int,
        size: int,
        features: int,
        inflight: SplitInflight | PackedInflight | None = None,
    ) -> None:
        self.index = index
        self.size = size
        #: Set once the driver put a malformed chain on the queue; nothing is popped then.
        self.broken = False
        #: Why the queue broke.
        self.failure: DescriptorError | None = None
        self._mem = mem
        self._event_idx = bool(features & VirtioFeature.RING_EVENT_IDX)
        self._indirect = bool(features & VirtioFeature.RING_INDIRECT_DESC)
        self._indirect_limit = max(size, MIN_INDIRECT_LIMIT)
        self._fence = Fence()
        self._in_flight: set[int] = set()
        self._kicks_enabled = True
        #: Chains filled and not yet published by `flush`.
        self._unpublished = 0
        #: Chains published since the last `should_notify`.
        self._pushed = 0
        self._inflight = inflight
        #: Chains the previous owner left in flight (found in the in-flight region) and
        #: how many of them were handed out again so far.
        self.recovered = 0
        self.resubmitted = 0
        #: The dirty log, while the front-end migrates the guest (None: not logging).
        self._log: DirtyLog | None = None
        #: Guest addresses of the ring areas the device writes, to log those stores
        #: (None: do not log them). See `set_log`.
        self._log_desc: int | None = None
        self._log_used: int | None = None

    def __repr__(self) -> str:
        state = "broken" if self.broken else f"{len(self._in_flight)} in flight"
        return f"<{type(self).__name__} {self.index} size {self.size}, {state}>"

    @property
    def in_flight(self) -> int:
        """Chains popped and not pushed yet."""
        return len(self._in_flight)

    def pop_batch(self, limit: int) -> list[DescriptorChain]:
        """Up to `limit` available chains, in ring order.

        A malformed chain breaks the queue: the chains before it are returned (they are
        in flight and must be completed), `broken` is set and `failure` says why.
        """
        chains: list[DescriptorChain] = []
        if self.broken:
            return chains
        in_flight = self._in_flight
        if self._unpublished and self._inflight is not None:
            self.flush()  # the region records takings only between published batches
        try:
            while len(chains) < limit:
                chain = self._pop()
                if chain is None:
                    break
                if chain.head in in_flight:
                    raise self._error(f"buffer {chain.head} made available while in flight")
                in_flight.add(chain.head)
                chains.append(chain)
        except DescriptorError as exc:
            self.broken = True
            self.failure = exc
            logger.debug("%r: %s", self, exc)
        if chains and self._event_idx and self._kicks_enabled:
            self._set_kicks(True)
        return chains

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None.

        Raises `DescriptorError` if the driver's chain is malformed; the queue is then
        broken and returns None forever.
        """
        was_broken = self.broken
        chains = self.pop_batch(1)
        if chains:
            return chains[0]
        if self.broken and not was_broken:
            assert self.failure is not None
            raise self.failure
        return None

    def fill(self, chain: DescriptorChain, written: int) -> None:
        """Write `chain`'s used entry (`written` bytes stored in its writable part).

        The driver sees it only after `flush`. Chains may be filled in any order.
        """
        if written < 0 or (written and written > chain.writable_len):
            raise ValueError(
                f"{self!r}: {written} bytes written into {chain.writable_len} writable"
            )
        try:
            self._in_flight.remove(chain.head)
        except KeyError:
            raise ValueError(f"{self!r}: chain {chain.head} is not in flight") from None
        self._fill(chain, written)
        if self._log is not None:
            self._log_fill(chain, written)
        if self._inflight is not None:
            self._inflight.filled(chain.head)
        self._unpublished += 1

    def flush(self) -> None:
        """Publish every entry filled since the last flush (one index or flags store)."""
        if self._unpublished:
            self._flush()
            self._pushed += self._unpublished
            self._unpublished = 0

    def push(self, chain: DescriptorChain, written: int) -> None:
        """`fill` and `flush` one chain. Call `should_notify` after a batch."""
        self.fill(chain, written)
        self.flush()

    def should_notify(self) -> bool:
        """True if the driver wants an interrupt for what was published since the last call."""
        if not self._pushed:
            return False
        self._fence()  # our used entries must be visible before we read the driver's wish
        pushed, self._pushed = self._pushed, 0
        return self._need_notify(pushed)

    def disable_kicks(self) -> None:
        """Ask the driver not to notify us of new buffers (we are draining the ring)."""
        if self._kicks_enabled:
            self._kicks_enabled = False
            self._set_kicks(False)

    def enable_kicks(self) -> bool:
        """Ask for notifications again; True if buffers arrived meanwhile (drain again)."""
        self._kicks_enabled = True
        self._set_kicks(True)
        self._fence()  # publish the request before looking at the ring again
        return self.has_available()

    def set_log(
        self, log: DirtyLog | None, desc_gpa: int | None = None, used_gpa: int | None = None
    ) -> None:
        """Mark what the device writes into guest memory in `log` from now on (None:
        stop). With `used_gpa`, the guest address of the used ring (of the device event
        area for a packed ring: SET_VRING_ADDR's log_guest_addr), the ring's own stores
        are marked too; a packed ring's used descriptors at `desc_gpa` + their offset.

        May be called while another thread serves the queue. VirtioError if the log does
        not cover those areas (nothing changes then).
        """
        if log is not None and used_gpa is not None:
            for name, gpa, length in self._logged_areas(desc_gpa, used_gpa):
                log.check(gpa, length, name)
        if log is None:
            self._log = None
        self._log_desc, self._log_used = desc_gpa, used_gpa
        self._log = log

    def _log_fill(self, chain: DescriptorChain, written: int) -> None:
        """Mark the first `written` bytes of `chain`'s writable buffers, and the used
        entry `_fill` just wrote."""
        log = self._log
        assert log is not None
        addrs = chain.addrs
        for i in range(2 * chain.nreadable, len(addrs), 2):
            if written <= 0:
                break
            length = min(addrs[i + 1], written)
            log.mark(addrs[i], length)
            written -= length
        if self._log_used is not None:
            self._log_used_entry(log)

    @abstractmethod
    def _log_used_entry(self, log: DirtyLog) -> None:
        """Mark the used entry `_fill` just wrote."""

    @abstractmethod
    def _logged_areas(self, desc_gpa: int | None, used_gpa: int) -> list[tuple[str, int, int]]:
        """(name, guest address, length) of each ring area the device writes."""

    @abstractmethod
    def has_available(self) -> bool:
        """True if the driver has made a chain available that `pop` has not taken."""

    @abstractmethod
    def get_base(self) -> int:
        """The ring position to report in GET_VRING_BASE."""

    @abstractmethod
    def _pop(self) -> DescriptorChain | None: ...

    @abstractmethod
    def _fill(self, chain: DescriptorChain, written: int) -> None: ...

    @abstractmethod
    def _flush(self) -> None: ...

    @abstractmethod
    def _need_notify(self, pushed: int) -> bool: ...

    @abstractmethod
    def _set_kicks(self, enabled: bool) -> None: ...

    # --- helpers for reading chains ----------------------------------------------------

    def _error(self, message: str) -> DescriptorError:
        return DescriptorError(f"queue {self.index}: {message}")

    def _chain(self, head: int, ndescs: int, descs: list[tuple[int, int, int]]) -> DescriptorChain:
        """The chain of direct descriptors `descs` ((addr, length, flags) each, as the
        layout read them), every buffer bounds-checked and translated."""
        gpa_views = self._mem.gpa_views
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        addrs: list[int] = []
        readable_len = writable_len = nreadable = 0
        for addr, length, flags in descs:
            try:
                views = gpa_views(addr, length)
            except GuestMemoryError as exc:
                raise self._error(f"descriptor buffer: {exc}") from exc
            if flags & F_WRITE:
                writable += views
                writable_len += length
            elif len(addrs) != 2 * nreadable:  # a writable one came before
                raise self._error("device-readable descriptor after a device-writable one")
            else:
                readable += views
                readable_len += length
                nreadable += 1
            addrs += (addr, length)
        return DescriptorChain(
            head, readable, writable, ndescs, addrs, nreadable, readable_len, writable_len
        )

    def _indirect_table(self, addr: int, length: int, flags: int, first: bool) -> bytes:
        """Validate an INDIRECT descriptor and return a copy of the table it points to."""
        if not self._indirect:
            raise self._error("indirect descriptor but RING_INDIRECT_DESC was not negotiated")
        if flags & F_NEXT or not first:
            raise self._error("an indirect descriptor must be alone in its chain")
        if length == 0 or length % DESC_SIZE:
            raise self._error(f"indirect table length {length} is not a positive multiple of 16")
        if length // DESC_SIZE > self._indirect_limit:
            raise self._error(
                f"indirect table of {length // DESC_SIZE} descriptors exceeds the limit of "
                f"{self._indirect_limit}"
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
