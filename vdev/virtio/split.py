"""Split virtqueues (virtio 1.2 section 2.7): descriptor table, avail ring, used ring."""

from __future__ import annotations

from collections import deque

from vdev.virtio.chain import DescriptorChain
from vdev.virtio.dirtylog import DirtyLog
from vdev.virtio.errors import VirtioError
from vdev.virtio.inflight import SplitInflight
from vdev.virtio.layout import (
    DESC,
    DESC_SIZE,
    F_INDIRECT,
    F_NEXT,
    SPLIT_RING_OFFSET,
    U16,
    USED_ELEM,
    AvailFlag,
    UsedFlag,
    split_notification_wanted,
    split_ring_sizes,
    write_split_suppression,
)
from vdev.virtio.memory import GuestMemory
from vdev.virtio.ring import Virtqueue

_IDX_OFFSET = 2
#: As a plain int: `int & IntFlag` builds an enum member on every call.
_NO_INTERRUPT = int(AvailFlag.NO_INTERRUPT)


class SplitQueue(Virtqueue):
    """The device side of a split virtqueue.

    `desc`, `avail` and `used` are views of the three ring areas; `base` is the
    SET_VRING_BASE value (the next avail ring entry to process). The used index is read
    from the used ring, where the previous owner of the queue left it. With `inflight`
    holding a previous owner's records, the queue resumes from them instead: the chains
    in flight first, then the avail entries after them.
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
        base: int = 0,
        inflight: SplitInflight | None = None,
    ) -> None:
        desc_len, avail_len, used_len = split_ring_sizes(size)
        super().__init__(mem, index, size, features, inflight)
        self._check_area("descriptor table", desc, desc_len)
        self._check_area("avail ring", avail, avail_len)
        self._check_area("used ring", used, used_len)
        if not 0 <= base <= 0xFFFF:
            raise VirtioError(f"queue {index}: split ring base {base:#x} exceeds 16 bits")
        self._desc = desc
        self._avail = avail
        self._used = used
        #: Offsets of used_event (in the avail ring) and avail_event (in the used ring).
        self._used_event_offset = SPLIT_RING_OFFSET + 2 * size
        self._avail_event_offset = SPLIT_RING_OFFSET + USED_ELEM.size * size
        self._last_avail = base
        #: Last avail idx read from the ring (saves a read per pop while draining).
        self._shadow_avail = base
        self._used_idx = U16.unpack_from(used, _IDX_OFFSET)[0]
        #: used.idx as a one-element u16 array: item assignment is a single 16-bit store.
        self._used_idx_field = used[_IDX_OFFSET : _IDX_OFFSET + U16.size].cast("H")
        self._resubmit: deque[int] = deque()
        if inflight is not None:
            heads = inflight.recover(self._used_idx)
            if heads is not None:
                self._resubmit.extend(heads)
                self.recovered = len(heads)
                self._last_avail = self._shadow_avail = (self._used_idx + len(heads)) & 0xFFFF
        self._set_kicks(True)

    def has_available(self) -> bool:
        return not self.broken and (
            bool(self._resubmit) or self._read_avail_idx() != self._last_avail
        )

    def get_base(self) -> int:
        return self._last_avail

    def _read_avail_idx(self) -> int:
        return U16.unpack_from(self._avail, _IDX_OFFSET)[0]

    def _pop(self) -> DescriptorChain | None:
        if self._resubmit:  # already recorded in the region
            self.resubmitted += 1
            return self._read_chain(self._resubmit.popleft())
        chain = self._pop_avail()
        if chain is not None and self._inflight is not None:
            self._inflight.popped(chain.head)
        return chain

    def _pop_avail(self) -> DescriptorChain | None:
        if self._shadow_avail == self._last_avail:
            self._shadow_avail = self._read_avail_idx()
            pending = (self._shadow_avail - self._last_avail) & 0xFFFF
            if not pending:
                return None
            if pending > self.size:
                raise self._error(
                    f"avail idx {self._shadow_avail} is {pending} entries ahead of "
                    f"{self._last_avail}, more than the queue size"
                )
        slot = self._last_avail % self.size
        head = U16.unpack_from(self._avail, SPLIT_RING_OFFSET + 2 * slot)[0]
        chain = self._read_chain(head)
        self._last_avail = (self._last_avail + 1) & 0xFFFF
        return chain

    def _read_chain(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise self._error(f"head descriptor {head} is beyond the queue size")
        descs: list[tuple[int, int, int]] = []
        index = head
        unpack, table = DESC.unpack_from, self._desc
        for count in range(1, self.size + 1):
            addr, length, flags, next_index = unpack(table, DESC_SIZE * index)
            if flags & F_INDIRECT:
                indirect = self._indirect_table(addr, length, flags, first=count == 1)
                descs = self._read_indirect(indirect)
                break
            descs.append((addr, length, flags))
            if not flags & F_NEXT:
                break
            if next_index >= self.size:
                raise self._error(f"descriptor {index} chains to {next_index}, beyond the queue")
            index = next_index
        else:
            raise self._error(f"chain from head {head} is longer than the queue (a loop?)")
        return self._chain(head, count, descs)

    def _read_indirect(self, table: bytes) -> list[tuple[int, int, int]]:
        entries = len(table) // DESC_SIZE
        descs = []
        index = 0
        for _ in range(entries):
            addr, length, flags, next_index = DESC.unpack_from(table, DESC_SIZE * index)
            self._check_indirect_entry(flags)
            descs.append((addr, length, flags))
            if not flags & F_NEXT:
                return descs
            if next_index >= entries:
                raise self._error(
                    f"indirect descriptor {index} chains to {next_index}, beyond the table"
                )
            index = next_index
        raise self._error("indirect chain is longer than its table (a loop?)")

    def _fill(self, chain: DescriptorChain, written: int) -> None:
        slot = (self._used_idx + self._unpublished) % self.size
        USED_ELEM.pack_into(
            self._used, SPLIT_RING_OFFSET + USED_ELEM.size * slot, chain.head, written
        )

    def _log_used_entry(self, log: DirtyLog) -> None:
        slot = (self._used_idx + self._unpublished) % self.size
        log.mark(self._log_used + SPLIT_RING_OFFSET + USED_ELEM.size * slot, USED_ELEM.size)  # type: ignore[operator]

    def _logged_areas(self, desc_gpa: int | None, used_gpa: int) -> list[tuple[str, int, int]]:
        return [("used ring", used_gpa, self._used.nbytes)]

    def _flush(self) -> None:
        # Elements before index: x86 keeps stores in order, so the driver never sees an
        # index covering an element that is not written yet.
        self._used_idx = (self._used_idx + self._unpublished) & 0xFFFF
        # Not U16.pack_into: struct zero-fills its target before storing the value, and a
        # driver polling from another CPU (DPDK) then sees used.idx == 0 for an instant,
        # takes stale used entries for new ones and corrupts its free list.
        self._used_idx_field[0] = self._used_idx
        if self._log is not None and self._log_used is not None:
            self._log.mark(self._log_used + _IDX_OFFSET, U16.size)
        if self._inflight is not None:
            self._inflight.published(self._used_idx)

    def _need_notify(self, pushed: int) -> bool:
        return split_notification_wanted(
            event_idx=self._event_idx,
            suppressed=bool(U16.unpack_from(self._avail, 0)[0] & _NO_INTERRUPT),
            event=U16.unpack_from(self._avail, self._used_event_offset)[0],
            new=self._used_idx,
            count=pushed,
        )

    def _set_kicks(self, enabled: bool) -> None:
        write_split_suppression(
            self._used,
            flag=UsedFlag.NO_NOTIFY,
            event_offset=self._avail_event_offset,
            enabled=enabled,
            event_idx=self._event_idx,
            idx=self._last_avail,
        )
        if self._log is not None and self._log_used is not None:
            self._log.mark(self._log_used, U16.size)  # flags
            self._log.mark(self._log_used + self._avail_event_offset, U16.size)
