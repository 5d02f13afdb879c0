"""The shared-memory channel between the core and a driver domain: virtqueues in a memfd.

A channel is one sealed memfd holding a few split virtqueues, each with two eventfds
(kick: core -> child, call: child -> core). The core is the *driver* side of every
ring (`DriverRing`, here); the child runs vdev.virtio's `SplitQueue` as the *device*
side, over a `GuestMemory` in which the channel memfd is mapped at `CHANNEL_GPA`.

Per ring the memfd holds the ring areas, one slot per descriptor (a request's result,
its header and its segment table: the slot of a chain is the slot of its head
descriptor), and a bounce area for data that does not travel by reference.

Data travels by reference (policy `map`: the child maps guest memory at the same guest
addresses) as a table of (guest address, length) segments, which one descriptor points
to, with the header: virtio's indirect-table idea in a leaner form (a guest's large
request can be scattered over a hundred pages; a table is cheaper to write and to read
than a chain of descriptors, and any number fits a ring). Otherwise (`copy`, or
buffers outside guest memory) the descriptors point into the bounce area, which the
core copies to and from.

Nothing here is async; the child imports this module without trio.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
from array import array
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from enum import IntEnum, IntFlag

from vdev.virtio.layout import (
    DESC,
    DESC_SIZE,
    SPLIT_RING_OFFSET,
    U16,
    USED_ELEM,
    AvailFlag,
    DescFlag,
    Fence,
    UsedFlag,
    split_notification_wanted,
    split_ring_sizes,
    write_split_suppression,
)

#: Where the channel memfd sits in the child's guest-address space (above any guest).
CHANNEL_GPA = 1 << 63
_IDX_OFFSET = 2
_PAGE = mmap.PAGESIZE

#: A request's header, device-readable: op, flags, segments in its table, byte offset,
#: length. Its segment table follows it (same descriptor).
REQUEST = struct.Struct("<IHHQQ")
#: A request's result, device-writable: errno (0: success), spare.
RESULT = struct.Struct("<iI")
#: A slot: the result (its own descriptor), then the header and the table.
REQUEST_OFFSET = RESULT.size
TABLE_OFFSET = REQUEST_OFFSET + REQUEST.size
#: A segment table entry: guest address, length (two u64).
TABLE_ENTRY = 16


#: Flags tested on the data path, as plain ints: IntFlag arithmetic builds enum members
#: and costs microseconds per operation.
NEXT = int(DescFlag.NEXT)
WRITE = int(DescFlag.WRITE)
NO_NOTIFY = int(UsedFlag.NO_NOTIFY)


class Op(IntEnum):
    """What a net request asks the child's backend to do. A block request carries its
    virtio-blk type (`vdev.devices.blk_requests.RequestType`) and its result is the
    virtio-blk status: the child runs it with the same `execute` as the core."""

    TRANSMIT = 16
    SET_FEATURES = 17


class OpFlag(IntFlag):
    """`flags` of a request header."""

    UNMAP = 1


class AdaptivePoll:
    """How long to poll before sleeping, adapted as QEMU's aio-poll does.

    The time grows (from `grow`, doubling, up to `limit`) while the waits it could have
    covered stay short, and halves, down to nothing, when a wait lasts longer than
    `limit`: an idle device costs no spinning, and neither does a busy machine, where
    a spin would only take the CPU from the process it is waiting for.
    """

    def __init__(self, grow: float, limit: float) -> None:
        self.grow = grow
        self.limit = limit
        self.time = 0.0

    def update(self, waited: float) -> None:
        """`waited`: how long the last wait took, polling included."""
        if waited > self.limit:
            self.time = self.time / 2 if self.time > self.grow else 0.0
        elif waited > self.time:
            self.time = min(max(self.time * 2, self.grow), self.limit)


class ChannelError(Exception):
    """The child broke the ring protocol (a used entry that is not in flight...)."""


@dataclass(frozen=True)
class RingLayout:
    """Where one ring's pieces are in the channel memfd (byte offsets)."""

    size: int
    desc: int
    avail: int
    used: int
    slots: int
    #: Entries of each slot's segment table.
    table_segments: int
    bounce: int
    bounce_len: int

    def to_wire(self) -> list[int]:
        return list(astuple(self))

    @classmethod
    def from_wire(cls, fields: Sequence[int]) -> RingLayout:
        if len(fields) != 8 or not all(isinstance(f, int) and f >= 0 for f in fields):
            raise ValueError(f"bad ring layout {fields!r}")
        return cls(*fields)

    @property
    def end(self) -> int:
        return self.bounce + self.bounce_len

    @property
    def slot_size(self) -> int:
        return TABLE_OFFSET + TABLE_ENTRY * self.table_segments


def _align(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def plan(rings: Sequence[tuple[int, int, int]]) -> tuple[list[RingLayout], int]:
    """Lay out rings given as (queue size, bounce bytes, segments per table); return
    them and the total size."""
    layouts = []
    offset = 0
    for size, bounce_len, segments in rings:
        desc_len, avail_len, used_len = split_ring_sizes(size)
        desc = offset
        avail = desc + desc_len
        used = _align(avail + avail_len, 4)
        slots = _align(used + used_len, TABLE_ENTRY)
        slot_size = TABLE_OFFSET + TABLE_ENTRY * segments
        bounce = _align(slots + slot_size * size, _PAGE)
        layouts.append(RingLayout(size, desc, avail, used, slots, segments, bounce, bounce_len))
        offset = _align(bounce + bounce_len, _PAGE)
    return layouts, offset


def check_layout(layouts: Sequence[RingLayout], total: int) -> None:
    """ValueError unless every ring lies within `total` bytes (the child checks this)."""
    for layout in layouts:
        desc_len, avail_len, used_len = split_ring_sizes(layout.size)
        pieces = (
            (layout.desc, desc_len),
            (layout.avail, avail_len),
            (layout.used, used_len),
            (layout.slots, layout.slot_size * layout.size),
            (layout.bounce, layout.bounce_len),
        )
        if any(start + length > total for start, length in pieces):
            raise ValueError(f"ring layout {layout} exceeds the channel ({total} bytes)")


class Arena:
    """A bounce area handed out first in, first out (the child completes in order).

    `alloc` returns the pieces (offset, length) of `n` bytes, two if they wrap around,
    and the position to `release` up to once the request is complete. Space goes in
    whole pages, so every piece is page aligned (as O_DIRECT wants its buffers).
    """

    def __init__(self, capacity: int) -> None:
        if capacity % _PAGE:
            raise ValueError(f"bounce area of {capacity} bytes is not whole pages")
        self.capacity = capacity
        self._head = 0
        self._tail = 0

    def alloc(self, n: int) -> tuple[list[tuple[int, int]], int] | None:
        reserved = _align(n, _PAGE)
        if reserved > self.capacity - (self._head - self._tail):
            return None
        start = self._head % self.capacity
        first = min(n, self.capacity - start)
        pieces = [(start, first)]
        if n > first:
            pieces.append((0, n - first))
        self._head += reserved
        return pieces, self._head

    def release(self, end: int) -> None:
        self._tail = max(self._tail, min(end, self._head))

    def release_all(self) -> None:
        self._tail = self._head


class DriverRing:
    """The driver side of a split virtqueue: publish chains, collect used ones.

    Lean on purpose (this is the data path): chains are lists of (address, length,
    flags) descriptors; a token rides with each chain and comes back with it. The used
    ring is written by the child, so everything read from it is checked. The two
    indices the sides poll are accessed as single 16-bit loads and stores (through
    `memoryview.cast`, not `struct.pack_into`, which zero-fills before storing).
    """

    def __init__(self, desc: memoryview, avail: memoryview, used: memoryview, size: int) -> None:
        self.size = size
        self._desc = desc
        self._avail = avail
        self._used = used
        self._free = list(range(size - 1, -1, -1))
        self._chains: list[tuple[int, ...]] = [()] * size
        #: The head published at each avail ring slot (ours: the ring itself is shared).
        self._avail_heads = [0] * size
        self._tokens: list[object | None] = [None] * size
        self._avail_idx_field = avail[_IDX_OFFSET : _IDX_OFFSET + U16.size].cast("H")
        self._used_idx_field = used[_IDX_OFFSET : _IDX_OFFSET + U16.size].cast("H")
        self._avail_idx = self._avail_idx_field[0]
        self._last_used = self._used_idx_field[0]
        self._published = 0
        self._fence = Fence()

    @property
    def free(self) -> int:
        """Descriptors available for new chains."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains published and not collected yet."""
        return (self._avail_idx - self._last_used) & 0xFFFF

    def next_head(self) -> int:
        """The head descriptor (so the slot) the next chain will get."""
        return self._free[-1]

    def add(self, descs: Sequence[tuple[int, int, int]], token: object) -> int:
        """Publish a chain; return its head. The caller checks `free` first."""
        free = self._free
        indices = [free.pop() for _ in descs]
        last = len(indices) - 1
        pack, table = DESC.pack_into, self._desc
        for i, (addr, length, flags) in enumerate(descs):
            if i < last:
                pack(
                    table,
                    DESC_SIZE * indices[i],
                    addr,
                    length,
                    flags | NEXT,
                    indices[i + 1],
                )
            else:
                pack(table, DESC_SIZE * indices[i], addr, length, flags, 0)
        head = indices[0]
        self._chains[head] = tuple(indices)
        self._tokens[head] = token
        slot = self._avail_idx % self.size
        self._avail_heads[slot] = head
        U16.pack_into(self._avail, SPLIT_RING_OFFSET + 2 * slot, head)
        # Entry before index (x86 keeps stores in order).
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self._avail_idx_field[0] = self._avail_idx
        self._published += 1
        return head

    def kick_needed(self) -> bool:
        """True if the child asked to be kicked for what was published since last time."""
        if not self._published:
            return False
        self._fence()
        published, self._published = self._published, 0
        return split_notification_wanted(
            event_idx=False,
            suppressed=bool(U16.unpack_from(self._used, 0)[0] & NO_NOTIFY),
            event=0,
            new=self._avail_idx,
            count=published,
        )

    def has_used(self) -> bool:
        return self._used_idx_field[0] != self._last_used

    def take_used(self) -> tuple[object, int] | None:
        """The next completed chain's token and written length, or None."""
        used_idx = self._used_idx_field[0]
        if used_idx == self._last_used:
            return None
        if (used_idx - self._last_used) & 0xFFFF > self.in_flight:
            raise ChannelError(f"used idx {used_idx} ran ahead of {self._last_used}")
        offset = SPLIT_RING_OFFSET + USED_ELEM.size * (self._last_used % self.size)
        head, written = USED_ELEM.unpack_from(self._used, offset)
        token = self._tokens[head] if head < self.size else None
        if token is None:
            raise ChannelError(f"the child returned descriptor {head}, which is not in flight")
        self._tokens[head] = None
        self._free.extend(self._chains[head])
        self._last_used = (self._last_used + 1) & 0xFFFF
        return token, written

    def set_interrupts(self, enabled: bool) -> None:
        """Ask the child to signal completions (or not, while we poll)."""
        write_split_suppression(
            self._avail,
            flag=AvailFlag.NO_INTERRUPT,
            event_offset=0,
            enabled=enabled,
            event_idx=False,
            idx=0,
        )
        if enabled:
            self._fence()  # publish the wish before looking at the used ring again

    def rewind(self, *, drop: bool = False) -> int:
        """Prepare the ring for a new child, the last one being dead. What it completed
        stays completed (we collect it as usual), unless its used index is not
        plausible: then back to what we collected. The chains it left unfinished are
        for the new child to process again, or with `drop` completed here as if
        nothing had been written. Returns how many there are."""
        used_idx = self._used_idx_field[0]
        if (used_idx - self._last_used) & 0xFFFF > self.in_flight:
            used_idx = self._used_idx_field[0] = self._last_used
        unfinished = (self._avail_idx - used_idx) & 0xFFFF
        if drop:
            for position in range(used_idx, used_idx + unfinished):
                slot = position % self.size
                offset = SPLIT_RING_OFFSET + USED_ELEM.size * slot
                USED_ELEM.pack_into(self._used, offset, self._avail_heads[slot], 0)
            self._used_idx_field[0] = self._avail_idx
        return unfinished

    def abandon(self) -> list[object]:
        """Drop every chain in flight (the domain is gone); their tokens. The ring is
        empty afterwards: a later child finds nothing to redo."""
        tokens = []
        for head, token in enumerate(self._tokens):
            if token is not None:
                tokens.append(token)
                self._free.extend(self._chains[head])
        self._tokens = [None] * self.size
        self._last_used = self._avail_idx
        self._used_idx_field[0] = self._avail_idx
        return tokens


class ChannelRing:
    """One ring of a channel as the core uses it: the driver ring, slots, bounce arena,
    eventfds, and the lock that keeps collecting and rewinding apart."""

    def __init__(self, index: int, layout: RingLayout, view: memoryview) -> None:
        self.index = index
        self.layout = layout
        desc_len, avail_len, used_len = split_ring_sizes(layout.size)
        self.ring = DriverRing(
            view[layout.desc : layout.desc + desc_len],
            view[layout.avail : layout.avail + avail_len],
            view[layout.used : layout.used + used_len],
            layout.size,
        )
        self._slot_size = layout.slot_size
        self._slots = view[layout.slots : layout.slots + self._slot_size * layout.size]
        self._slot_words = self._slots.cast("Q")
        self.bounce = view[layout.bounce : layout.end]
        self.arena = Arena(layout.bounce_len)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.lock = threading.Lock()

    def request(
        self, head: int, op: int, flags: int, offset: int, length: int, refs: Sequence[int] = ()
    ) -> list[tuple[int, int, int]]:
        """Write the request of the chain headed by `head` into its slot, `refs` (guest
        address, length, ...) as its segment table; return the chain's first
        descriptor (header and table) and its last (the result)."""
        slot = self._slot_size * head
        segments = len(refs) // 2
        REQUEST.pack_into(self._slots, slot + REQUEST_OFFSET, op, flags, segments, offset, length)
        if refs:
            start = (slot + TABLE_OFFSET) // 8
            self._slot_words[start : start + len(refs)] = array("Q", refs)
        gpa = CHANNEL_GPA + self.layout.slots + slot
        readable = REQUEST.size + TABLE_ENTRY * segments
        return [(gpa + REQUEST_OFFSET, readable, 0), (gpa, RESULT.size, WRITE)]

    def abandon(self) -> list[object]:
        """Drop every request in flight and free its bounce space; their tokens."""
        tokens = self.ring.abandon()
        self.arena.release_all()
        return tokens

    def result(self, head: int) -> int:
        """The errno the child left in the slot of `head` (0: success)."""
        return int(RESULT.unpack_from(self._slots, self._slot_size * head)[0])

    def bounce_gpa(self, offset: int) -> int:
        return CHANNEL_GPA + self.layout.bounce + offset

    def kick(self) -> None:
        if self.ring.kick_needed():
            os.eventfd_write(self.kick_fd, 1)

    def wake(self) -> None:
        """Make the call eventfd readable (wakes whoever waits for completions)."""
        os.eventfd_write(self.call_fd, 1)

    def clear_call(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.call_fd)

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            os.close(fd)
        self.kick_fd = self.call_fd = -1


class Channel:
    """The core's end of a channel: a sealed memfd mapped here, and its rings.

    Sealing stops the child from shrinking the memfd under the core (a SIGBUS here).
    The channel outlives child processes: a restarted child maps the same memfd and
    finds every request that was in flight still on the rings.
    """

    def __init__(
        self, rings: Sequence[tuple[int, int, int]], name: str = "vdev-domain-channel"
    ) -> None:
        self.layouts, self.size = plan(rings)
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(
                self.fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
            )
            self._map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        self._view = memoryview(self._map)
        self.rings = [ChannelRing(i, layout, self._view) for i, layout in enumerate(self.layouts)]

    def fds(self) -> list[int]:
        """What the child is sent: the memfd, then kick and call eventfd of each ring."""
        fds = [self.fd]
        for ring in self.rings:
            fds += [ring.kick_fd, ring.call_fd]
        return fds

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        os.close(self.fd)
        self.rings = []
        self._view.release()
        # If views of it still exist somewhere, it is unmapped when they go.
        with contextlib.suppress(BufferError):
            self._map.close()


def copy_views(dst: Sequence[memoryview], src: Sequence[memoryview]) -> None:
    """Copy the bytes of scatter list `src` into scatter list `dst` (equal totals)."""
    si, s_off = 0, 0
    for view in dst:
        d_off = 0
        while d_off < view.nbytes:
            piece = src[si]
            n = min(view.nbytes - d_off, piece.nbytes - s_off)
            view[d_off : d_off + n] = piece[s_off : s_off + n]
            d_off += n
            s_off += n
            if s_off == piece.nbytes:
                si, s_off = si + 1, 0
