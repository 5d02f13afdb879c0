"""The driver side of split and packed virtqueues, for tests and fake front-ends.

`DriverSplitRing` and `DriverPackedRing` play the guest driver's part over memory
shared with a device: they lay out the ring, publish chains of buffers, tell whether
the device wants a kick, and collect the used buffers with what the device wrote.
They honour the device's notification suppression (including EVENT_IDX) and let a
test suppress the device's interrupts the same way.

Example, driving vdev's own device side over fake memory::

    mem = FakeGuestMemory()
    ring = DriverSplitRing(mem, 16, features=VirtioFeature.RING_EVENT_IDX)
    queue = make_queue(mem, 0, ring.size, ring.desc_addr, ring.avail_addr,
                       ring.used_addr, features=ring.features, base=ring.base)
    token = ring.add([b"request"], [512])
    assert ring.kick_needed()
    chain = queue.pop()
    queue.push(chain, chain.write_into(b"response"))
    [(done, written, data)] = ring.get_used()   # (token, 8, [b"response"])
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from vdev.virtio.features import VirtioFeature
from vdev.virtio.layout import (
    DESC,
    DESC_SIZE,
    PACKED_DESC_BODY,
    PACKED_FLAGS_OFFSET,
    PACKED_LEN_ID,
    PACKED_LEN_OFFSET,
    SPLIT_RING_OFFSET,
    U16,
    USED_ELEM,
    AvailFlag,
    DescFlag,
    Fence,
    UsedFlag,
    avail_used_bits,
    is_used,
    packed_notification_wanted,
    packed_ring_sizes,
    split_notification_wanted,
    split_ring_sizes,
    write_packed_suppression,
    write_split_suppression,
)
from vdev.virtio.packed import PACKED_INITIAL_BASE

_IDX_OFFSET = 2


class DriverMemory(Protocol):
    """What a driver ring needs from guest memory (`FakeGuestMemory` provides it)."""

    def alloc(self, size: int, align: int = 16) -> int: ...
    def free(self, gpa: int) -> None: ...
    def gpa_view(self, gpa: int, length: int) -> memoryview: ...
    def read(self, gpa: int, length: int) -> bytes: ...
    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...
    def user_addr(self, gpa: int) -> int: ...


class RingFullError(Exception):
    """Not enough free descriptors (or buffer ids) for the chain: collect used ones first."""


class DeviceProtocolError(Exception):
    """The device broke the ring protocol (unknown buffer, too many used entries...)."""


class UsedBuffer(NamedTuple):
    """A chain the device has completed."""

    token: int
    #: Bytes the device reported written.
    written: int
    #: Content of each writable buffer, trimmed to `written` bytes in total.
    data: list[bytes]

    @property
    def last_byte(self) -> int:
        """The last writable byte, whatever the device reports written (a virtio-blk
        request's status ends its buffers)."""
        return self._whole[-1][-1]  # type: ignore[attr-defined, no-any-return]


class _Used(UsedBuffer):
    """A UsedBuffer that also keeps the whole writable buffers (it still compares as
    the (token, written, data) tuple)."""

    _whole: list[bytes]


@dataclass(frozen=True, slots=True)
class _Element:
    gpa: int
    length: int
    writable: bool

    @property
    def flags(self) -> int:
        return DescFlag.WRITE if self.writable else 0


@dataclass(frozen=True, slots=True)
class _InFlight:
    token: int
    elements: tuple[_Element, ...]
    #: Guest blocks to free on completion (buffers, indirect table).
    blocks: tuple[int, ...]
    #: Ring descriptors the chain occupies (split: table indices, packed: positions).
    descs: tuple[int, ...]


def _block_size(length: int) -> int:
    """Round buffer sizes to powers of 2 so that freed blocks get reused."""
    return max(16, 1 << (length - 1).bit_length())


class _DriverRing(ABC):
    """What both driver ring layouts share: buffers, tokens, notification bookkeeping."""

    #: User addresses of the three ring areas, for SET_VRING_ADDR.
    desc_addr: int
    avail_addr: int
    used_addr: int
    #: Guest addresses of the areas the device writes: the descriptors (which a packed
    #: ring's device writes) and the used ring (a packed ring's device event area).
    desc_gpa: int
    used_gpa: int

    def __init__(self, mem: DriverMemory, size: int, features: int) -> None:
        self.mem = mem
        self.size = size
        #: The features the device must be told about (pass them to the device side).
        self.features = features
        self._event_idx = bool(features & VirtioFeature.RING_EVENT_IDX)
        self._indirect_ok = bool(features & VirtioFeature.RING_INDIRECT_DESC)
        self._tokens = itertools.count()
        self._fence = Fence()
        self._interrupts_enabled = True
        #: Ring entries published since the last `kick_needed`.
        self._published = 0
        #: The SET_VRING_BASE value for a device starting on this ring.
        self.base = 0
        #: Chains in flight by head descriptor (split) or buffer id (packed).
        self._in_flight: dict[int, _InFlight] = {}

    def _area(self, length: int, align: int) -> tuple[int, memoryview]:
        gpa = self.mem.alloc(length, align)
        self.mem.write(gpa, bytes(length))
        return gpa, self.mem.gpa_view(gpa, length)

    @property
    def in_flight(self) -> int:
        """Chains added and not yet returned by `get_used`."""
        return len(self._in_flight)

    def add(
        self, readable: Sequence[bytes], writable_sizes: Sequence[int], *, indirect: bool = False
    ) -> int:
        """Publish a chain: buffers holding `readable`, then empty writable buffers.

        Returns a token that `get_used` reports back. With ``indirect=True`` the chain
        goes in an indirect table (RING_INDIRECT_DESC must be among the features).
        Raises `RingFullError` if the ring lacks room.
        """
        count = len(readable) + len(writable_sizes)
        if not count:
            raise ValueError("a chain needs at least one buffer")
        if indirect and not self._indirect_ok:
            raise ValueError("indirect chains need RING_INDIRECT_DESC")
        self._reserve(1 if indirect else count)
        elements: list[_Element] = []
        for data in readable:
            gpa = self.mem.alloc(_block_size(len(data)))
            self.mem.write(gpa, data)
            elements.append(_Element(gpa, len(data), writable=False))
        for length in writable_sizes:
            elements.append(_Element(self.mem.alloc(_block_size(length)), length, writable=True))
        blocks = [e.gpa for e in elements]
        table: int | None = None
        if indirect:
            entries = self._indirect_entries(elements)
            table = self.mem.alloc(len(entries), DESC_SIZE)
            self.mem.write(table, entries)
            blocks.append(table)
        token = next(self._tokens)
        self._publish(token, tuple(elements), tuple(blocks), table)
        return token

    def buffers(self, token: int) -> list[tuple[int, int, bool]]:
        """(guest address, length, writable) of each buffer of chain `token`, until
        `get_used` returns it."""
        for in_flight in self._in_flight.values():
            if in_flight.token == token:
                return [(e.gpa, e.length, e.writable) for e in in_flight.elements]
        raise KeyError(f"chain {token} is not in flight")

    def get_used(self) -> list[UsedBuffer]:
        """Collect the chains the device has completed, oldest first."""
        done = []
        while (entry := self._take_used()) is not None:
            in_flight, written = entry
            done.append(self._complete(in_flight, written))
        if self._interrupts_enabled:
            self._set_interrupts(True)  # with EVENT_IDX: move the event past what we took
        return done

    def kick_needed(self) -> bool:
        """True if the device wants a kick for what was added since the last call."""
        if not self._published:
            return False
        self._fence()  # our entries must be visible before we read the device's wish
        published, self._published = self._published, 0
        return self._need_kick(published)

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt us (NO_INTERRUPT, used_event, DISABLE)."""
        self._interrupts_enabled = False
        self._set_interrupts(False)

    def enable_interrupts(self) -> bool:
        """Ask for interrupts again; True if used buffers are already waiting."""
        self._interrupts_enabled = True
        self._set_interrupts(True)
        self._fence()
        return self.has_used()

    def _complete(self, in_flight: _InFlight, written: int) -> UsedBuffer:
        writable = [e for e in in_flight.elements if e.writable]
        if written > sum(e.length for e in writable):
            raise DeviceProtocolError(f"device wrote {written} bytes, more than the buffers")
        buffers = [self.mem.read(e.gpa, e.length) for e in writable]
        data = []
        left = written
        for content in buffers:
            data.append(content[:left])
            left -= len(data[-1])
        for gpa in in_flight.blocks:
            self.mem.free(gpa)
        used = _Used(in_flight.token, written, data)
        used._whole = buffers
        return used

    @abstractmethod
    def has_used(self) -> bool:
        """True if the device has returned chains that `get_used` has not collected."""

    @abstractmethod
    def _reserve(self, slots: int) -> None: ...

    @abstractmethod
    def _indirect_entries(self, elements: Sequence[_Element]) -> bytes: ...

    @abstractmethod
    def _publish(
        self, token: int, elements: tuple[_Element, ...], blocks: tuple[int, ...], table: int | None
    ) -> None: ...

    @abstractmethod
    def _take_used(self) -> tuple[_InFlight, int] | None: ...

    @abstractmethod
    def _need_kick(self, published: int) -> bool: ...

    @abstractmethod
    def _set_interrupts(self, enabled: bool) -> None: ...


class DriverSplitRing(_DriverRing):
    """The driver side of a split virtqueue.

    `start_idx` starts the free-running avail and used indices elsewhere than 0, as if
    the ring had already carried that many chains (to exercise 16-bit wrap-around);
    the device must then be given `base`.
    """

    def __init__(
        self, mem: DriverMemory, size: int, *, features: int = 0, start_idx: int = 0
    ) -> None:
        desc_len, avail_len, used_len = split_ring_sizes(size)
        super().__init__(mem, size, features)
        desc_gpa, self._desc = self._area(desc_len, 16)
        avail_gpa, self._avail = self._area(avail_len, 2)
        used_gpa, self._used = self._area(used_len, 4)
        self.desc_addr = mem.user_addr(desc_gpa)
        self.avail_addr = mem.user_addr(avail_gpa)
        self.used_addr = mem.user_addr(used_gpa)
        self.desc_gpa, self.used_gpa = desc_gpa, used_gpa
        self._used_event_offset = SPLIT_RING_OFFSET + 2 * size
        self._avail_event_offset = SPLIT_RING_OFFSET + USED_ELEM.size * size
        self._free_descs = list(range(size - 1, -1, -1))
        self._avail_idx = self._last_used = self.base = start_idx & 0xFFFF
        U16.pack_into(self._avail, _IDX_OFFSET, self._avail_idx)
        U16.pack_into(self._used, _IDX_OFFSET, self._last_used)
        #: avail.idx as a u16 item: one 16-bit store (struct.pack_into zero-fills first,
        #: and a device polling from another process would see a transient 0).
        self._avail_idx_field = self._avail[_IDX_OFFSET : _IDX_OFFSET + 2].cast("H")
        self._set_interrupts(True)

    @property
    def device_used_idx(self) -> int:
        """The used index the device published (in guest memory)."""
        return U16.unpack_from(self._used, _IDX_OFFSET)[0]

    def has_used(self) -> bool:
        return self.device_used_idx != self._last_used

    def _reserve(self, slots: int) -> None:
        if len(self._free_descs) < slots:
            raise RingFullError(f"{slots} descriptors wanted, {len(self._free_descs)} free")

    def _indirect_entries(self, elements: Sequence[_Element]) -> bytes:
        last = len(elements) - 1
        return b"".join(
            DESC.pack(e.gpa, e.length, e.flags | (DescFlag.NEXT if i < last else 0), i + 1)
            for i, e in enumerate(elements)
        )

    def _publish(
        self, token: int, elements: tuple[_Element, ...], blocks: tuple[int, ...], table: int | None
    ) -> None:
        if table is not None:
            head = self._free_descs.pop()
            descs: tuple[int, ...] = (head,)
            length = DESC_SIZE * len(elements)
            DESC.pack_into(self._desc, DESC_SIZE * head, table, length, DescFlag.INDIRECT, 0)
        else:
            descs = tuple(self._free_descs.pop() for _ in elements)
            for i, (index, e) in enumerate(zip(descs, elements, strict=True)):
                more = i + 1 < len(descs)
                flags = e.flags | (DescFlag.NEXT if more else 0)
                next_index = descs[i + 1] if more else 0
                DESC.pack_into(self._desc, DESC_SIZE * index, e.gpa, e.length, flags, next_index)
        self._in_flight[descs[0]] = _InFlight(token, elements, blocks, descs)
        slot = self._avail_idx % self.size
        U16.pack_into(self._avail, SPLIT_RING_OFFSET + 2 * slot, descs[0])
        # Entry before index (x86 keeps stores in order).
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self._avail_idx_field[0] = self._avail_idx
        self._published += 1

    def _take_used(self) -> tuple[_InFlight, int] | None:
        used_idx = U16.unpack_from(self._used, _IDX_OFFSET)[0]
        if used_idx == self._last_used:
            return None
        if (used_idx - self._last_used) & 0xFFFF > self.size:
            raise DeviceProtocolError(f"used idx {used_idx} ran ahead of {self._last_used}")
        slot = self._last_used % self.size
        head, written = USED_ELEM.unpack_from(self._used, SPLIT_RING_OFFSET + USED_ELEM.size * slot)
        in_flight = self._in_flight.pop(head, None)
        if in_flight is None:
            raise DeviceProtocolError(f"device returned descriptor {head}, which is not in flight")
        self._free_descs.extend(in_flight.descs)
        self._last_used = (self._last_used + 1) & 0xFFFF
        return in_flight, written

    def _need_kick(self, published: int) -> bool:
        return split_notification_wanted(
            event_idx=self._event_idx,
            suppressed=bool(U16.unpack_from(self._used, 0)[0] & UsedFlag.NO_NOTIFY),
            event=U16.unpack_from(self._used, self._avail_event_offset)[0],
            new=self._avail_idx,
            count=published,
        )

    def _set_interrupts(self, enabled: bool) -> None:
        write_split_suppression(
            self._avail,
            flag=AvailFlag.NO_INTERRUPT,
            event_offset=self._used_event_offset,
            enabled=enabled,
            event_idx=self._event_idx,
            idx=self._last_used,
        )


class DriverPackedRing(_DriverRing):
    """The driver side of a packed virtqueue.

    `avail_addr` is the driver event suppression area and `used_addr` the device one,
    as vhost-user's SET_VRING_ADDR carries them for packed rings.
    """

    def __init__(self, mem: DriverMemory, size: int, *, features: int = 0) -> None:
        desc_len, driver_len, device_len = packed_ring_sizes(size)
        super().__init__(mem, size, features | VirtioFeature.RING_PACKED)
        desc_gpa, self._desc = self._area(desc_len, 16)
        driver_gpa, self._driver_event = self._area(driver_len, 4)
        device_gpa, self._device_event = self._area(device_len, 4)
        self.desc_addr = mem.user_addr(desc_gpa)
        self.avail_addr = mem.user_addr(driver_gpa)
        self.used_addr = mem.user_addr(device_gpa)
        self.desc_gpa, self.used_gpa = desc_gpa, device_gpa
        self._next_avail, self._avail_wrap = 0, True
        self._next_used, self._used_wrap = 0, True
        self._free_slots = size
        self._free_ids = list(range(size - 1, -1, -1))
        self.base = PACKED_INITIAL_BASE
        self._set_interrupts(True)

    def has_used(self) -> bool:
        return is_used(self._flags(self._next_used), self._used_wrap)

    def _flags(self, pos: int) -> int:
        return U16.unpack_from(self._desc, DESC_SIZE * pos + PACKED_FLAGS_OFFSET)[0]

    def _reserve(self, slots: int) -> None:
        if self._free_slots < slots or not self._free_ids:
            raise RingFullError(f"{slots} descriptors wanted, {self._free_slots} free")

    def _indirect_entries(self, elements: Sequence[_Element]) -> bytes:
        return b"".join(DESC.pack(e.gpa, e.length, 0, e.flags) for e in elements)

    def _publish(
        self, token: int, elements: tuple[_Element, ...], blocks: tuple[int, ...], table: int | None
    ) -> None:
        buffer_id = self._free_ids.pop()
        if table is not None:
            parts = [(table, DESC_SIZE * len(elements), int(DescFlag.INDIRECT))]
        else:
            last = len(elements) - 1
            parts = [
                (e.gpa, e.length, e.flags | (DescFlag.NEXT if i < last else 0))
                for i, e in enumerate(elements)
            ]
        positions: list[int] = []
        head_flags = 0
        for addr, length, flags in parts:
            offset = DESC_SIZE * self._next_avail
            ring_flags = flags | avail_used_bits(self._avail_wrap, used=False)
            PACKED_DESC_BODY.pack_into(self._desc, offset, addr, length, buffer_id)
            if positions:
                U16.pack_into(self._desc, offset + PACKED_FLAGS_OFFSET, ring_flags)
            else:
                head_flags = ring_flags
            positions.append(self._next_avail)
            self._next_avail += 1
            if self._next_avail == self.size:
                self._next_avail, self._avail_wrap = 0, not self._avail_wrap
        # The head's flags last: they make the whole chain available at once.
        head = DESC_SIZE * positions[0] + PACKED_FLAGS_OFFSET
        self._desc[head : head + 2].cast("H")[0] = head_flags  # one store, as above
        self._free_slots -= len(positions)
        self._in_flight[buffer_id] = _InFlight(token, elements, blocks, tuple(positions))
        self._published += len(positions)

    def _take_used(self) -> tuple[_InFlight, int] | None:
        offset = DESC_SIZE * self._next_used
        flags = self._flags(self._next_used)
        if not is_used(flags, self._used_wrap):
            return None
        written, buffer_id = PACKED_LEN_ID.unpack_from(self._desc, offset + PACKED_LEN_OFFSET)
        in_flight = self._in_flight.pop(buffer_id, None)
        if in_flight is None:
            raise DeviceProtocolError(f"device returned buffer {buffer_id}, which is not in flight")
        self._next_used += len(in_flight.descs)
        if self._next_used >= self.size:
            self._next_used -= self.size
            self._used_wrap = not self._used_wrap
        self._free_slots += len(in_flight.descs)
        self._free_ids.append(buffer_id)
        return in_flight, written if flags & DescFlag.WRITE else 0

    def _need_kick(self, published: int) -> bool:
        return packed_notification_wanted(
            self._device_event,
            event_idx=self._event_idx,
            pos=self._next_avail,
            wrap=self._avail_wrap,
            count=published,
            size=self.size,
        )

    def _set_interrupts(self, enabled: bool) -> None:
        write_packed_suppression(
            self._driver_event,
            enabled=enabled,
            event_idx=self._event_idx,
            pos=self._next_used,
            wrap=self._used_wrap,
        )
