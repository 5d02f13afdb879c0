"""In-flight request tracking in shared memory, for recovery after a back-end crash.

vhost-user's INFLIGHT_SHMFD: the back-end keeps, in a buffer the front-end holds on to
(GET_INFLIGHT_FD / SET_INFLIGHT_FD), which requests it has taken from each queue and not
yet completed. A back-end that dies at any instruction leaves a buffer from which its
successor re-submits exactly those requests, in the order they were taken, and none
that the driver already saw completed. The layouts and the update order are those of
the spec's "Inflight I/O tracking" section: `SplitInflight` for split queues,
`PackedInflight` for packed ones; `InflightBuffer` holds one region per queue.

Every store into a region is one aligned store of its field's width (memoryview item
assignment, never ``struct.pack_into``, which zero-fills first), so a crash between any
two stores leaves a state the recovery steps understand.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vdev.virtio.errors import VirtioError
from vdev.virtio.layout import F_AVAIL, F_NEXT, F_USED, avail_used_bits

logger = logging.getLogger(__name__)

#: Version a region is stamped with once initialised (0: a fresh, zeroed buffer).
VERSION = 1
#: Regions start at multiples of this within the buffer.
REGION_ALIGN = 64
_SPLIT_HEADER = 16
_SPLIT_ENTRY = 16
_PACKED_HEADER = 32
_PACKED_ENTRY = 32
_AVAIL_USED = F_AVAIL | F_USED


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region, large enough for either ring layout."""
    return -(-(_PACKED_HEADER + _PACKED_ENTRY * queue_size) // REGION_ALIGN) * REGION_ALIGN


class InflightBuffer:
    """The shared buffer: a region per queue, over a memfd mapping."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int):
        """Map `fd` (kept open, owned by this object) as described by the front-end."""
        if not num_queues or not queue_size:
            raise VirtioError(f"in-flight buffer for {num_queues} queues of {queue_size}")
        self.region_size = queue_region_size(queue_size)
        if mmap_size < num_queues * self.region_size:
            raise VirtioError(
                f"in-flight buffer of {mmap_size} bytes, {num_queues} queues of "
                f"{queue_size} need {num_queues * self.region_size}"
            )
        if mmap_offset % mmap.PAGESIZE:
            raise VirtioError(f"in-flight buffer offset {mmap_offset:#x} is not page aligned")
        if os.fstat(fd).st_size < mmap_offset + mmap_size:
            raise VirtioError("in-flight buffer is larger than its file")
        self.fd = fd
        self.mmap_size = mmap_size
        self.num_queues = num_queues
        self.queue_size = queue_size
        self._map = mmap.mmap(fd, mmap_size, offset=mmap_offset)
        self._view = memoryview(self._map)

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> InflightBuffer:
        """A new zeroed buffer on a memfd (what GET_INFLIGHT_FD hands out)."""
        size = num_queues * queue_region_size(queue_size)
        fd = os.memfd_create("vdev-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, 0, num_queues, queue_size)
        except BaseException:
            os.close(fd)
            raise

    def region(self, index: int) -> memoryview:
        """The region of queue `index`."""
        if not 0 <= index < self.num_queues:
            raise VirtioError(f"queue {index} has no in-flight region ({self.num_queues})")
        return self._view[index * self.region_size : (index + 1) * self.region_size]

    def close(self) -> None:
        """Close the fd; unmap now, or when the last region view handed out is dropped."""
        os.close(self.fd)
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            logger.debug("in-flight buffer still has views in use; unmapped when dropped")


class _Region:
    """Typed views of one queue's region."""

    def __init__(self, view: memoryview, size: int, header: int, entry: int) -> None:
        if view.nbytes < header + entry * size:
            raise VirtioError(f"in-flight region of {view.nbytes} bytes for a queue of {size}")
        self.size = size
        self.u8 = view
        self.u16 = view[: view.nbytes // 2 * 2].cast("H")
        self.u32 = view[: view.nbytes // 4 * 4].cast("I")
        self.u64 = view[: view.nbytes // 8 * 8].cast("Q")
        self._header, self._entry = header, entry

    def entry(self, index: int, offset: int, width: int) -> int:
        """Item index, in the view of that width, of a field of entry `index`."""
        return (self._header + self._entry * index + offset) // width

    def clear(self) -> None:
        self.u8[:] = bytes(self.u8.nbytes)

    def marked(self) -> list[int]:
        """The entries whose inflight flag is set, oldest request first."""
        entries = [i for i in range(self.size) if self.u8[self.entry(i, 0, 1)]]
        entries.sort(key=lambda i: self.u64[self.entry(i, 8, 8)])
        return entries


class SplitInflight:
    """Tracking for a split queue (QueueRegionSplit of the spec).

    Header: features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16;
    then per descriptor: inflight u8, padding, next u16 at 6, counter u64 at 8.
    """

    def __init__(self, view: memoryview, size: int) -> None:
        self._r = _Region(view, size, _SPLIT_HEADER, _SPLIT_ENTRY)
        self._counter = 0
        self._batch: list[int] = []

    def recover(self, used_idx: int) -> list[int] | None:
        """Bring the region in line with the used ring's index `used_idx` and return the
        heads to re-submit, oldest first; None for a fresh region (nothing recorded)."""
        r = self._r
        if r.u16[4] != VERSION or r.u16[5] != r.size:
            r.clear()
            r.u16[5] = r.size
            r.u16[7] = used_idx
            r.u16[4] = VERSION
            return None
        last = (used_idx - r.u16[7]) & 0xFFFF
        if last > r.size:
            logger.warning(
                "in-flight region says used idx %d, the ring %d: not this ring's; "
                "nothing re-submitted",
                r.u16[7],
                used_idx,
            )
            r.u16[4] = 0
            return self.recover(used_idx)
        head = r.u16[6]
        for _ in range(last):  # published before the crash, flags not cleared yet
            r.u8[r.entry(head, 0, 1)] = 0
            head = r.u16[r.entry(head, 6, 2)]
        r.u16[7] = used_idx
        heads = r.marked()
        self._counter = max((r.u64[r.entry(i, 8, 8)] for i in heads), default=0) + 1
        return heads

    def in_flight(self) -> list[int]:
        """Heads marked in flight (taken, completion not recorded yet), oldest first."""
        return self._r.marked()

    def popped(self, head: int) -> None:
        r = self._r
        r.u64[r.entry(head, 8, 8)] = self._counter
        self._counter += 1
        r.u8[r.entry(head, 0, 1)] = 1

    def filled(self, head: int) -> None:
        r = self._r
        r.u16[r.entry(head, 6, 2)] = r.u16[6]
        r.u16[6] = head
        self._batch.append(head)

    def published(self, used_idx: int) -> None:
        """The used index was stored: the batch filled since the last call is done."""
        r = self._r
        for head in self._batch:
            r.u8[r.entry(head, 0, 1)] = 0
        self._batch.clear()
        r.u16[7] = used_idx


#: A packed ring descriptor as read from the ring: (addr, len, id, flags).
RingDesc = tuple[int, int, int, int]


@dataclass(frozen=True)
class PackedRecovery:
    """What a packed queue resumes from: positions and the chains to re-submit."""

    next_avail: int
    avail_wrap: bool
    next_used: int
    used_wrap: bool
    #: The ring descriptors of each chain to re-submit, oldest first.
    chains: list[list[RingDesc]]


class PackedInflight:
    """Tracking for a packed queue (QueueRegionPacked of the spec).

    Header: features u64, version u16 at 8, desc_num u16 at 10, free_head u16 at 12,
    old_free_head u16 at 14, used_idx u16 at 16, old_used_idx u16 at 18,
    used_wrap_counter u8 at 20, old_used_wrap_counter u8 at 21. Entries (32 bytes):
    inflight u8, next u16 at 2, last u16 at 4, num u16 at 6, counter u64 at 8, id u16 at
    16, flags u16 at 18, len u32 at 20, addr u64 at 24. Free entries form a list through
    `next`; a taken chain's descriptors sit in consecutive list entries, its head entry
    holding `num` and `last`. Chains are handed back one at a time (`returning`, the
    ring's flags store, `returned`), so that the old_* fields always describe a state
    the driver saw.
    """

    _FREE, _OLD_FREE, _USED, _OLD_USED = 6, 7, 8, 9  # u16 items of the header
    _WRAP, _OLD_WRAP = 20, 21  # u8 items of the header

    def __init__(self, view: memoryview, size: int) -> None:
        self._r = _Region(view, size, _PACKED_HEADER, _PACKED_ENTRY)
        self._counter = 0
        #: Head entry of each chain in flight, by buffer id.
        self._entries: dict[int, int] = {}
        self._batch: list[int] = []

    def recover(
        self, ring_flags: Callable[[int], int], used: int, used_wrap: bool
    ) -> PackedRecovery | None:
        """Roll the region back or forward to a consistent state and say where the
        queue resumes; None for a fresh region, which starts at the queue's used
        position (`used`, `used_wrap`). `ring_flags(pos)` reads the flags of ring
        descriptor `pos`."""
        r = self._r
        if r.u16[4] != VERSION or r.u16[5] != r.size:
            self._initialise(used, used_wrap)
            return None
        # (an index back where it was after a whole lap still moved: compare the wraps)
        if (r.u16[self._USED], r.u8[self._WRAP]) != (r.u16[self._OLD_USED], r.u8[self._OLD_WRAP]):
            # A chain is handed back alone: if the descriptor at the old used position no
            # longer shows as available, its flags were stored and the update holds.
            available = avail_used_bits(bool(r.u8[self._OLD_WRAP]), used=False)
            if ring_flags(r.u16[self._OLD_USED]) & _AVAIL_USED != available:
                self._commit()
        r.u16[self._FREE] = r.u16[self._OLD_FREE]
        r.u16[self._USED] = r.u16[self._OLD_USED]
        r.u8[self._WRAP] = r.u8[self._OLD_WRAP]
        for entry in self._free_entries():
            r.u8[r.entry(entry, 0, 1)] = 0
        heads = r.marked()
        self._counter = max((r.u64[r.entry(i, 8, 8)] for i in heads), default=0) + 1
        chains = []
        used, used_wrap = r.u16[self._USED], bool(r.u8[self._WRAP])
        pos, wrap = used, used_wrap
        for head in heads:
            descs = list(self._chain_descs(head))
            self._entries[descs[-1][2]] = head
            chains.append(descs)
            pos += len(descs)
            if pos >= r.size:
                pos, wrap = pos - r.size, not wrap
        return PackedRecovery(pos, wrap, used, used_wrap, chains)

    def _initialise(self, used: int, wrap: bool) -> None:
        r = self._r
        r.clear()
        for i in range(r.size):
            r.u16[r.entry(i, 2, 2)] = i + 1
        r.u16[5] = r.size
        r.u16[self._USED] = r.u16[self._OLD_USED] = used
        r.u8[self._WRAP] = r.u8[self._OLD_WRAP] = wrap
        r.u16[4] = VERSION

    def _commit(self) -> None:
        r = self._r
        r.u16[self._OLD_FREE] = r.u16[self._FREE]
        r.u16[self._OLD_USED] = r.u16[self._USED]
        r.u8[self._OLD_WRAP] = r.u8[self._WRAP]

    def _free_entries(self) -> Iterator[int]:
        r = self._r
        entry, seen = r.u16[self._FREE], 0
        while entry < r.size and seen <= r.size:
            yield entry
            entry, seen = r.u16[r.entry(entry, 2, 2)], seen + 1

    def _chain_descs(self, head: int) -> Iterator[RingDesc]:
        r = self._r
        entry = head
        for _ in range(min(r.u16[r.entry(head, 6, 2)], r.size)):
            yield (
                r.u64[r.entry(entry, 24, 8)],
                r.u32[r.entry(entry, 20, 4)],
                r.u16[r.entry(entry, 16, 2)],
                r.u16[r.entry(entry, 18, 2)],
            )
            entry = r.u16[r.entry(entry, 2, 2)]

    def in_flight(self) -> list[int]:
        """Head entries of the chains marked in flight (taken, not handed back yet),
        oldest first."""
        return self._r.marked()

    def popped(self, descs: list[RingDesc]) -> None:
        """A chain was taken: its ring descriptors, in order."""
        r = self._r
        head = r.u16[self._OLD_FREE]
        r.u16[r.entry(head, 6, 2)] = 0
        r.u64[r.entry(head, 8, 8)] = self._counter
        self._counter += 1
        r.u8[r.entry(head, 0, 1)] = 1
        free = r.u16[self._FREE]
        for n, (addr, length, buffer_id, flags) in enumerate(descs, 1):
            if free >= r.size:
                raise VirtioError("in-flight region has no free entry left")
            if not flags & F_NEXT:
                r.u16[r.entry(head, 4, 2)] = free
            r.u16[r.entry(head, 6, 2)] = n
            r.u64[r.entry(free, 24, 8)] = addr
            r.u32[r.entry(free, 20, 4)] = length
            r.u16[r.entry(free, 16, 2)] = buffer_id
            r.u16[r.entry(free, 18, 2)] = flags
            free = r.u16[r.entry(free, 2, 2)]
            r.u16[self._FREE] = free
        r.u16[self._OLD_FREE] = free
        self._entries[descs[-1][2]] = head

    def filled(self, buffer_id: int) -> None:
        """A chain's used entry was written (published by `returning` and `returned`)."""
        self._batch.append(self._entries.pop(buffer_id))

    def returning(self) -> None:
        """The next filled chain is about to be handed back: free its entries and move
        the used position past its descriptors (before its flags are stored)."""
        r = self._r
        head = self._batch[0]
        r.u16[r.entry(r.u16[r.entry(head, 4, 2)], 2, 2)] = r.u16[self._FREE]
        r.u16[self._FREE] = head
        used = r.u16[self._USED] + r.u16[r.entry(head, 6, 2)]
        if used >= r.size:
            r.u16[self._USED] = used - r.size
            r.u8[self._WRAP] = not r.u8[self._WRAP]
        else:
            r.u16[self._USED] = used

    def returned(self) -> None:
        """Its flags were stored: the chain is done for good."""
        r = self._r
        r.u8[r.entry(self._batch.pop(0), 0, 1)] = 0
        self._commit()
