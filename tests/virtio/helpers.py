"""Helpers for the virtio data-plane tests: a driver ring and a device queue over
fake guest memory, and raw descriptor writers for hostile chains."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vdev.testing.driver_rings import DriverPackedRing, DriverSplitRing
from vdev.testing.fakemem import FakeGuestMemory
from vdev.virtio.errors import DescriptorError
from vdev.virtio.features import VirtioFeature
from vdev.virtio.layout import (
    DESC,
    DESC_SIZE,
    SPLIT_RING_OFFSET,
    U16,
    avail_used_bits,
)
from vdev.virtio.queue import Virtqueue, make_queue

KINDS = ("split", "packed")
ALL_FEATURES = VirtioFeature.RING_EVENT_IDX | VirtioFeature.RING_INDIRECT_DESC


@dataclass
class Pair:
    """A driver ring and the device queue serving it."""

    mem: FakeGuestMemory
    driver: DriverSplitRing | DriverPackedRing
    queue: Virtqueue

    @property
    def packed(self) -> bool:
        return isinstance(self.driver, DriverPackedRing)

    def reopen(self, base: int) -> Virtqueue:
        """A new device queue on the same ring, as after GET/SET_VRING_BASE."""
        self.queue = device_queue(self.mem, self.driver, base=base)
        return self.queue


def device_queue(
    mem: FakeGuestMemory,
    driver: DriverSplitRing | DriverPackedRing,
    *,
    base: int,
    index: int = 0,
    inflight: memoryview | None = None,
) -> Virtqueue:
    return make_queue(
        mem,
        index,
        driver.size,
        driver.desc_addr,
        driver.avail_addr,
        driver.used_addr,
        features=driver.features,
        base=base,
        inflight=inflight,
    )


def make_pair(
    kind: str,
    *,
    size: int = 8,
    features: int = ALL_FEATURES,
    mem: FakeGuestMemory | None = None,
    index: int = 0,
    start_idx: int = 0,
) -> Pair:
    mem = mem if mem is not None else FakeGuestMemory()
    driver: DriverSplitRing | DriverPackedRing
    if kind == "split":
        driver = DriverSplitRing(mem, size, features=features, start_idx=start_idx)
    else:
        driver = DriverPackedRing(mem, size, features=features)
    return Pair(mem, driver, device_queue(mem, driver, base=driver.base, index=index))


class RawSplit:
    """Writes a split ring by hand, the way a hostile driver would."""

    def __init__(self, pair: Pair) -> None:
        self.mem = pair.mem
        self.driver = pair.driver
        self.size = pair.driver.size
        self.avail_idx = pair.driver.base

    def desc(self, index: int, addr: int, length: int, flags: int = 0, next_index: int = 0) -> None:
        self.mem.write(
            self.driver.desc_addr + DESC_SIZE * index, DESC.pack(addr, length, flags, next_index)
        )

    def publish(self, head: int, *, idx_step: int = 1) -> None:
        slot = self.avail_idx % self.size
        self.mem.write(self.driver.avail_addr + SPLIT_RING_OFFSET + 2 * slot, U16.pack(head))
        self.avail_idx = (self.avail_idx + idx_step) & 0xFFFF
        self.mem.write(self.driver.avail_addr + 2, U16.pack(self.avail_idx))


class RawPacked:
    """Writes a packed ring by hand (fresh ring: positions from 0, wrap counter 1)."""

    def __init__(self, pair: Pair) -> None:
        self.mem = pair.mem
        self.driver = pair.driver
        self.size = pair.driver.size
        self.pos = 0
        self.wrap = True

    def desc(
        self, addr: int, length: int, flags: int = 0, buffer_id: int = 0, *, available: bool = True
    ) -> None:
        """Write the next descriptor (available for the current wrap counter, or not)."""
        bits = avail_used_bits(self.wrap, used=False) if available else 0
        self.mem.write(
            self.driver.desc_addr + DESC_SIZE * self.pos,
            DESC.pack(addr, length, buffer_id, flags | bits),
        )
        self.pos += 1
        if self.pos == self.size:
            self.pos, self.wrap = 0, not self.wrap


def table(*entries: tuple[int, int, int, int]) -> bytes:
    """An indirect descriptor table from (addr, len, flags-or-id, next-or-flags) tuples."""
    return b"".join(DESC.pack(*entry) for entry in entries)


def write_buffer(mem: FakeGuestMemory, data: bytes) -> int:
    gpa = mem.alloc(max(len(data), 1))
    mem.write(gpa, data)
    return gpa


def assert_broken_alone(pair: Pair, reason: str) -> None:
    """The queue raises once, then stays broken; another queue is unaffected."""
    with pytest.raises(DescriptorError, match=f"^queue 0: .*{reason}"):
        pair.queue.pop()
    assert pair.queue.broken
    assert pair.queue.pop() is None
    assert not pair.queue.has_available()
    other = make_pair("packed" if pair.packed else "split", mem=pair.mem, index=1)
    token = other.driver.add([b"still"], [8])
    chain = other.queue.pop()
    assert chain is not None and chain.read_all() == b"still"
    other.queue.push(chain, chain.write_into(b"working"))
    assert other.driver.get_used() == [(token, 7, [b"working"])]
