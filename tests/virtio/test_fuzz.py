"""Property tests: whatever the driver writes, a queue yields chains of views inside
guest memory, or None, or DescriptorError (and then nothing more)."""

from __future__ import annotations

import contextlib

from hypothesis import event, given, settings
from hypothesis import strategies as st

from vdev.testing.driver_rings import DriverPackedRing, DriverSplitRing, RingFullError
from vdev.testing.fakemem import FakeGuestMemory
from vdev.virtio.chain import DescriptorChain
from vdev.virtio.errors import DescriptorError
from vdev.virtio.features import VirtioFeature
from vdev.virtio.layout import (
    DESC,
    DescFlag,
    avail_used_bits,
    packed_ring_sizes,
    split_ring_sizes,
)
from vdev.virtio.queue import PackedQueue, SplitQueue, Virtqueue, make_queue

SIZE = 8
PAGE = 4096
BASE = 0x10_0000
END = BASE + 4 * PAGE
#: Where fuzzed indirect tables (and data) live, so that in-range addresses hit them.
DATA = BASE + 2 * PAGE - 64

u16 = st.integers(0, 0xFFFF)
in_memory = st.integers(BASE, END - 1)
addresses = st.one_of(
    in_memory,
    in_memory,
    in_memory,
    st.sampled_from([0, DATA, BASE + 2 * PAGE - 3, END - 16, END, 2**64 - 16]),
    st.integers(0, 2**64 - 1),
)
small = st.integers(0, 80)
lengths = st.one_of(
    small, small, st.sampled_from([16 * k for k in range(12)]), st.integers(0, 2**32 - 1)
)
#: Mostly plausible ring indices, sometimes anything.
slots = st.one_of(st.integers(0, SIZE - 1), st.integers(0, SIZE - 1), u16)
#: Combinations of the chain flags, or anything.
flags = st.one_of(
    st.sets(st.sampled_from([DescFlag.NEXT, DescFlag.WRITE, DescFlag.INDIRECT])).map(
        lambda bits: sum(bits, 0)
    ),
    u16,
)
#: Split: (addr, len, flags, next). Packed: (addr, len, id, flags).
descriptors = st.builds(DESC.pack, addresses, lengths, flags, st.one_of(flags, slots))


#: A descriptor area: structured descriptors, or plain random bytes.
def tables(count: int) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.lists(descriptors, min_size=count, max_size=count).map(b"".join),
        st.binary(min_size=16 * count, max_size=16 * count),
    )


features = st.sets(
    st.sampled_from([VirtioFeature.RING_INDIRECT_DESC, VirtioFeature.RING_EVENT_IDX])
).map(lambda bits: sum(bits, 0))


def _mark_available(desc: bytes, start: int, wrap: bool) -> bytes:
    ring = bytearray(desc)
    for pos in range(SIZE):
        lap_wrap = wrap if pos >= start else not wrap
        flags = int.from_bytes(ring[16 * pos + 14 : 16 * pos + 16], "little")
        flags &= ~(DescFlag.AVAIL | DescFlag.USED)
        flags |= avail_used_bits(lap_wrap, used=False)
        ring[16 * pos + 14 : 16 * pos + 16] = flags.to_bytes(2, "little")
    return bytes(ring)


def _memory(data: bytes) -> FakeGuestMemory:
    mem = FakeGuestMemory(4 * PAGE, base=BASE, regions=2)
    mem.write(DATA, data)
    return mem


def _drain(mem: FakeGuestMemory, queue: Virtqueue, pushes: list[int]) -> None:
    """Exercise the queue; every view must lie in guest memory."""
    queue.has_available()
    chains: list[DescriptorChain] = []
    for _ in range(3 * SIZE):
        try:
            chain = queue.pop()
        except DescriptorError:
            event("descriptor error")
            assert queue.broken
            assert queue.pop() is None
            assert not queue.has_available()
            break
        if chain is None:
            break
        event("chain")
        for view in chain.readable + chain.writable:
            index, offset = mem.locate(view)  # raises if outside guest memory
            assert offset + view.nbytes <= mem.regions[index].size
        chains.append(chain)
    for chain, fraction in zip(chains, pushes, strict=False):
        queue.push(chain, chain.writable_len * fraction // 4)
    queue.should_notify()
    queue.disable_kicks()
    queue.enable_kicks()
    queue.get_base()


@settings(max_examples=300, deadline=None)
@given(
    desc=tables(SIZE),
    indirect=tables(4),
    avail=st.lists(slots, min_size=SIZE + 1, max_size=SIZE + 1),
    ahead=st.one_of(st.integers(0, SIZE), st.integers(1, SIZE), u16),
    base=u16,
    used_idx=u16,
    features=features,
    pushes=st.lists(st.integers(0, 4)),
)
def test_split_queue_survives_anything(
    desc: bytes,
    indirect: bytes,
    avail: list[int],
    ahead: int,
    base: int,
    used_idx: int,
    features: int,
    pushes: list[int],
) -> None:
    mem = _memory(indirect)
    desc_len, avail_len, used_len = split_ring_sizes(SIZE)
    desc_gpa, avail_gpa, used_gpa = mem.alloc(desc_len), mem.alloc(avail_len), mem.alloc(used_len)
    mem.write(desc_gpa, desc)
    avail_idx = (base + ahead) & 0xFFFF
    mem.write(avail_gpa, b"".join(x.to_bytes(2, "little") for x in [0, avail_idx, *avail]))
    mem.write(used_gpa + 2, used_idx.to_bytes(2, "little"))
    queue = SplitQueue(
        mem,
        0,
        SIZE,
        mem.gpa_view(desc_gpa, desc_len),
        mem.gpa_view(avail_gpa, avail_len),
        mem.gpa_view(used_gpa, used_len),
        features=features,
        base=base,
    )
    _drain(mem, queue, pushes)


@settings(max_examples=300, deadline=None)
@given(
    desc=tables(SIZE),
    indirect=tables(4),
    events=st.binary(min_size=8, max_size=8),
    avail_pos=st.integers(0, SIZE - 1),
    used_pos=st.integers(0, SIZE - 1),
    wraps=st.integers(0, 3),
    mark_available=st.sampled_from([True, True, False]),
    features=features,
    pushes=st.lists(st.integers(0, 4)),
)
def test_packed_queue_survives_anything(
    desc: bytes,
    indirect: bytes,
    events: bytes,
    avail_pos: int,
    used_pos: int,
    wraps: int,
    mark_available: bool,
    features: int,
    pushes: list[int],
) -> None:
    mem = _memory(indirect)
    if mark_available:  # make the avail/used bits right, so that chains get parsed
        desc = _mark_available(desc, avail_pos, bool(wraps & 1))
    desc_len, event_len, _ = packed_ring_sizes(SIZE)
    desc_gpa, driver_gpa, device_gpa = mem.alloc(desc_len), mem.alloc(4, 4), mem.alloc(4, 4)
    mem.write(desc_gpa, desc)
    mem.write(driver_gpa, events[:4])
    mem.write(device_gpa, events[4:])
    base = avail_pos | (wraps & 1) << 15 | (used_pos | (wraps >> 1) << 15) << 16
    queue = PackedQueue(
        mem,
        0,
        SIZE,
        mem.gpa_view(desc_gpa, desc_len),
        mem.gpa_view(driver_gpa, event_len),
        mem.gpa_view(device_gpa, event_len),
        features=features,
        base=base,
    )
    _drain(mem, queue, pushes)


#: A chain shape for the driver: (readable buffer sizes, writable sizes, indirect).
shapes = st.tuples(
    st.lists(st.integers(0, 40), max_size=3),
    st.lists(st.integers(0, 40), max_size=3),
    st.booleans(),
).filter(lambda shape: bool(shape[0] or shape[1]))
#: (which 16-byte descriptor slot, which field, value) applied to a valid ring.
corruptions = st.lists(
    st.tuples(st.integers(0, 1000), st.integers(0, 3), st.one_of(addresses, lengths, flags)),
    min_size=1,
    max_size=3,
)
FIELDS = ((0, 8), (8, 4), (12, 2), (14, 2))  # addr, len, flags/id, next/flags


def _descriptor_slots(mem: FakeGuestMemory, desc_addr: int, packed: bool) -> list[int]:
    """Addresses of the ring's descriptors and of the indirect table entries they use."""
    slots = []
    for i in range(SIZE):
        addr, length, third, fourth = DESC.unpack(mem.read(desc_addr + 16 * i, 16))
        slots.append(desc_addr + 16 * i)
        if (fourth if packed else third) & DescFlag.INDIRECT:
            slots.extend(addr + 16 * k for k in range(length // 16))
    return slots


@settings(max_examples=500, deadline=None)
@given(
    packed=st.booleans(),
    chains=st.lists(shapes, min_size=1, max_size=4),
    corruption=corruptions,
    pushes=st.lists(st.integers(0, 4)),
)
def test_corrupted_valid_ring(
    packed: bool,
    chains: list[tuple[list[int], list[int], bool]],
    corruption: list[tuple[int, int, int]],
    pushes: list[int],
) -> None:
    mem = FakeGuestMemory(4 * PAGE, base=BASE, regions=2)
    feats = VirtioFeature.RING_INDIRECT_DESC | VirtioFeature.RING_EVENT_IDX
    driver = (DriverPackedRing if packed else DriverSplitRing)(mem, SIZE, features=feats)
    for readable, writable, indirect in chains:
        with contextlib.suppress(RingFullError):
            driver.add([bytes(n) for n in readable], writable, indirect=indirect)
    slots = _descriptor_slots(mem, driver.desc_addr, packed)
    for slot, field, value in corruption:
        offset, width = FIELDS[field]
        mem.write(slots[slot % len(slots)] + offset, (value % 256**width).to_bytes(width, "little"))
    queue = make_queue(
        mem,
        0,
        SIZE,
        driver.desc_addr,
        driver.avail_addr,
        driver.used_addr,
        features=driver.features,
        base=driver.base,
    )
    _drain(mem, queue, pushes)
