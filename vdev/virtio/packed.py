"""Packed virtqueues (virtio 1.2 section 2.8): one descriptor ring, two event areas.

vhost-user's SET_VRING_ADDR reuses its split-ring fields for packed rings: the
descriptor address is the descriptor ring, the "avail" address the driver event
suppression area (Driver Area) and the "used" address the device event suppression area
(Device Area).
"""

from __future__ import annotations

from collections import deque

from vdev.virtio.chain import DescriptorChain
from vdev.virtio.dirtylog import DirtyLog
from vdev.virtio.errors import VirtioError
from vdev.virtio.inflight import PackedInflight, RingDesc
from vdev.virtio.layout import (
    DESC,
    DESC_SIZE,
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    PACKED_FLAGS_OFFSET,
    PACKED_LEN_ID,
    PACKED_LEN_OFFSET,
    U16,
    WRAP_BIT,
    avail_used_bits,
    is_available,
    off_wrap,
    packed_notification_wanted,
    packed_ring_sizes,
    write_packed_suppression,
)
from vdev.virtio.memory import GuestMemory
from vdev.virtio.ring import Virtqueue

#: SET_VRING_BASE of a fresh packed queue: positions 0, both wrap counters 1.
PACKED_INITIAL_BASE = WRAP_BIT | WRAP_BIT << 16


class PackedQueue(Virtqueue):
    """The device side of a packed virtqueue.

    `avail` is the driver event suppression area and `used` the device event
    suppression area (see the module docstring). `base` uses the vhost-user encoding:
    bits 0-14 next available position, bit 15 its wrap counter, bits 16-30 next used
    position, bit 31 its wrap counter. With `inflight` holding a previous owner's
    records, the positions come from them and the chains in flight are handed out first.
    """

    def __init__(
        self,
        mem: GuestMemory,
        index: int,
        size: int,
        desc: memoryview,
        avail: memoryview,
        used: memoryview,
        *,
        features: int,
        base: int = PACKED_INITIAL_BASE,
        inflight: PackedInflight | None = None,
    ) -> None:
        desc_len, driver_len, device_len = packed_ring_sizes(size)
        super().__init__(mem, index, size, features, inflight)
        self._check_area("descriptor ring", desc, desc_len)
        self._check_area("driver event suppression", avail, driver_len)
        self._check_area("device event suppression", used, device_len)
        avail_half, used_half = base & 0xFFFF, base >> 16
        self._next_avail, self._avail_wrap = avail_half & ~WRAP_BIT, bool(avail_half & WRAP_BIT)
        self._next_used, self._used_wrap = used_half & ~WRAP_BIT, bool(used_half & WRAP_BIT)
        if not 0 <= base <= 0xFFFF_FFFF or max(self._next_avail, self._next_used) >= size:
            raise VirtioError(f"queue {index}: packed ring base {base:#x} does not fit size {size}")
        self._desc = desc
        #: The descriptor ring as u16s, to store a flags field in a single 16-bit store.
        self._desc_u16 = desc[:desc_len].cast("H")
        self._resubmit: deque[list[RingDesc]] = deque()
        if inflight is not None:
            state = inflight.recover(self._flags, self._next_used, self._used_wrap)
            if state is not None:
                self._next_avail, self._avail_wrap = state.next_avail, state.avail_wrap
                self._next_used, self._used_wrap = state.next_used, state.used_wrap
                self._resubmit.extend(state.chains)
                self.recovered = len(state.chains)
        self._driver_event = avail
        self._device_event = used
        #: Descriptors used since the last `should_notify`.
        self._advanced = 0
        #: AVAIL/USED bits that mark a descriptor used in the current lap.
        self._used_flags = avail_used_bits(self._used_wrap, used=True)
        #: (u16 index, flags) of the filled descriptors `flush` hands back.
        self._unpublished_flags: list[tuple[int, int]] = []
        self._set_kicks(True)

    def has_available(self) -> bool:
        return not self.broken and (
            bool(self._resubmit) or is_available(self._flags(self._next_avail), self._avail_wrap)
        )

    def get_base(self) -> int:
        avail = off_wrap(self._next_avail, self._avail_wrap)
        return avail | off_wrap(self._next_used, self._used_wrap) << 16

    def _flags(self, pos: int) -> int:
        return U16.unpack_from(self._desc, DESC_SIZE * pos + PACKED_FLAGS_OFFSET)[0]

    def _pop(self) -> DescriptorChain | None:
        resubmit = bool(self._resubmit)  # already recorded in the region
        if resubmit:
            ring_descs = self._resubmit.popleft()
            self.resubmitted += 1
        elif self.has_available():
            ring_descs = self._take_avail()
        else:
            return None
        descs: list[tuple[int, int, int]] = []
        for n, (addr, length, _, flags) in enumerate(ring_descs):
            if flags & F_INDIRECT:
                indirect = self._indirect_table(addr, length, flags, first=n == 0)
                descs = self._read_indirect(indirect)
            else:
                descs.append((addr, length, flags))
        # The buffer id is the one of the last descriptor.
        chain = self._chain(ring_descs[-1][2], len(ring_descs), descs)
        if self._inflight is not None and not resubmit:
            self._inflight.popped(ring_descs)
        return chain

    def _take_avail(self) -> list[RingDesc]:
        """The ring descriptors of the next available chain; the position moves past it."""
        ring_descs: list[RingDesc] = []
        pos, wrap = self._next_avail, self._avail_wrap
        unpack, table = DESC.unpack_from, self._desc
        for count in range(1, self.size + 1):
            desc = unpack(table, DESC_SIZE * pos)
            flags = desc[3]
            if count > 1 and not is_available(flags, wrap):
                raise self._error(f"chain continues into descriptor {pos}, not made available")
            ring_descs.append(desc)
            pos += 1
            if pos == self.size:
                pos, wrap = 0, not wrap
            if not flags & F_NEXT:
                break
        else:
            raise self._error("chain is longer than the queue")
        self._next_avail, self._avail_wrap = pos, wrap
        return ring_descs

    def _read_indirect(self, table: bytes) -> list[tuple[int, int, int]]:
        # Entries are consecutive; WRITE is their only meaningful flag.
        descs = []
        for offset in range(0, len(table), DESC_SIZE):
            addr, length, _, flags = DESC.unpack_from(table, offset)
            self._check_indirect_entry(flags)
            descs.append((addr, length, flags & F_WRITE))
        return descs

    def _fill(self, chain: DescriptorChain, written: int) -> None:
        offset = DESC_SIZE * self._next_used
        PACKED_LEN_ID.pack_into(self._desc, offset + PACKED_LEN_OFFSET, written, chain.head)
        flags = self._used_flags
        if written:
            flags |= F_WRITE
        self._unpublished_flags.append(((offset + PACKED_FLAGS_OFFSET) // U16.size, flags))
        self._next_used += chain.ndescs
        if self._next_used >= self.size:
            self._next_used -= self.size
            self._used_wrap = not self._used_wrap
            self._used_flags = avail_used_bits(self._used_wrap, used=True)
        self._advanced += chain.ndescs

    def _flush(self) -> None:
        # Flags hand descriptors back: the first one last, so that the driver, which
        # reads in ring order, sees the whole batch at once (x86 keeps stores in order).
        # Not U16.pack_into, which zero-fills first: in a wrap-0 lap the driver would
        # take the transient 0 for "used", reuse the descriptor, and then lose its new
        # flags under our store.
        pending, field, inflight = self._unpublished_flags, self._desc_u16, self._inflight
        if inflight is None:
            for index, flags in reversed(pending):
                field[index] = flags
        else:
            # In ring order, one chain at a time: the region records where a crash
            # between two flags stores left the ring.
            for index, flags in pending:
                inflight.returning()
                field[index] = flags
                inflight.returned()
        if self._log is not None and self._log_used is not None:
            for index, _ in pending:  # the whole descriptor: id and len too
                self._log.mark(self._log_desc + U16.size * index - PACKED_FLAGS_OFFSET, DESC_SIZE)  # type: ignore[operator]
        pending.clear()

    def _log_used_entry(self, log: DirtyLog) -> None:
        """Nothing yet: `_flush` marks each descriptor once its flags are stored."""

    def _logged_areas(self, desc_gpa: int | None, used_gpa: int) -> list[tuple[str, int, int]]:
        if desc_gpa is None:
            raise VirtioError(f"queue {self.index}: a packed ring logs its descriptor stores")
        return [
            ("descriptor ring", desc_gpa, self._desc.nbytes),
            ("device event suppression area", used_gpa, self._device_event.nbytes),
        ]

    def _need_notify(self, pushed: int) -> bool:
        advanced, self._advanced = self._advanced, 0
        return packed_notification_wanted(
            self._driver_event,
            event_idx=self._event_idx,
            pos=self._next_used,
            wrap=self._used_wrap,
            count=advanced,
            size=self.size,
        )

    def _set_kicks(self, enabled: bool) -> None:
        write_packed_suppression(
            self._device_event,
            enabled=enabled,
            event_idx=self._event_idx,
            pos=self._next_avail,
            wrap=self._avail_wrap,
        )
        if self._log is not None and self._log_used is not None:
            self._log.mark(self._log_used, self._device_event.nbytes)
