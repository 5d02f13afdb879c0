"""Packed rings: hostile chains, region spanning, base encoding, used descriptors."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vdev.testing.fakemem import FakeGuestMemory
from vdev.virtio.errors import VirtioError
from vdev.virtio.features import VirtioFeature
from vdev.virtio.layout import DESC, DescFlag
from vdev.virtio.queue import PACKED_INITIAL_BASE, PackedQueue
from vdev.virtio.ring import MIN_INDIRECT_LIMIT

from .helpers import Pair, RawPacked, assert_broken_alone, make_pair, table, write_buffer

NEXT, WRITE, INDIRECT = DescFlag.NEXT, DescFlag.WRITE, DescFlag.INDIRECT
SIZE = 8


def _setup(features: int = VirtioFeature.RING_INDIRECT_DESC) -> tuple[Pair, RawPacked]:
    pair = make_pair("packed", size=SIZE, features=features, mem=FakeGuestMemory(regions=2))
    return pair, RawPacked(pair)


def _chain_longer_than_queue(raw: RawPacked, buf: int) -> None:
    for _ in range(SIZE):
        raw.desc(buf, 4, NEXT)


def _chain_into_unavailable(raw: RawPacked, buf: int) -> None:
    raw.desc(buf, 4, NEXT)
    raw.desc(buf, 4, available=False)


def _address_below_memory(raw: RawPacked, buf: int) -> None:
    raw.desc(0x1000, 4)


def _buffer_into_hole(raw: RawPacked, buf: int) -> None:
    raw.desc(raw.mem.end - 8, 16, WRITE)


def _readable_after_writable(raw: RawPacked, buf: int) -> None:
    raw.desc(buf, 4, WRITE | NEXT)
    raw.desc(buf, 4)


def _indirect_with_next(raw: RawPacked, buf: int) -> None:
    raw.desc(write_buffer(raw.mem, table((buf, 4, 0, 0))), 16, INDIRECT | NEXT)
    raw.desc(buf, 4)


def _indirect_after_direct(raw: RawPacked, buf: int) -> None:
    raw.desc(buf, 4, NEXT)
    raw.desc(write_buffer(raw.mem, table((buf, 4, 0, 0))), 16, INDIRECT)


def _indirect_table(length: int, entries: bytes = b"") -> Callable[[RawPacked, int], None]:
    def setup(raw: RawPacked, buf: int) -> None:
        raw.desc(write_buffer(raw.mem, entries or bytes(max(length, 16))), length, INDIRECT)

    return setup


def _nested_indirect(raw: RawPacked, buf: int) -> None:
    inner = write_buffer(raw.mem, table((buf, 4, 0, 0)))
    _indirect_table(16, table((inner, 16, 0, INDIRECT)))(raw, buf)


HOSTILE = {
    "chain-longer-than-queue": (_chain_longer_than_queue, "longer than the queue"),
    "chain-into-unavailable": (_chain_into_unavailable, "not made available"),
    "address-below-memory": (_address_below_memory, "not mapped"),
    "buffer-into-hole": (_buffer_into_hole, "not mapped"),
    "readable-after-writable": (_readable_after_writable, "readable descriptor after"),
    "indirect-with-next": (_indirect_with_next, "must be alone"),
    "indirect-after-direct": (_indirect_after_direct, "must be alone"),
    "indirect-zero-length": (_indirect_table(0), "length 0 is not"),
    "indirect-length-not-multiple-of-16": (_indirect_table(24), "length 24 is not"),
    "indirect-larger-than-limit": (
        _indirect_table(16 * (MIN_INDIRECT_LIMIT + 1)),
        "exceeds the limit",
    ),
    "nested-indirect": (_nested_indirect, "inside an indirect table"),
    "indirect-readable-after-writable": (
        _indirect_table(32, table((1 << 20, 4, 0, WRITE), (1 << 20, 4, 0, 0))),
        "after a device-w",
    ),
    "indirect-entry-outside-memory": (_indirect_table(16, table((0, 4, 0, 0))), "mapped"),
}


@pytest.mark.parametrize(("setup", "reason"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_chain_breaks_only_its_queue(
    setup: Callable[[RawPacked, int], None], reason: str
) -> None:
    pair, raw = _setup()
    setup(raw, write_buffer(pair.mem, b"data"))
    assert_broken_alone(pair, reason)


def test_indirect_without_the_feature() -> None:
    pair, raw = _setup(features=0)
    buf = write_buffer(pair.mem, b"data")
    _indirect_table(16, table((buf, 4, 0, 0)))(raw, buf)
    assert_broken_alone(pair, "RING_INDIRECT_DESC was not negotiated")


def test_buffer_id_already_in_flight() -> None:
    pair, raw = _setup()
    buf = write_buffer(pair.mem, b"data")
    raw.desc(buf, 4, buffer_id=5)
    raw.desc(buf, 4, buffer_id=5)
    assert pair.queue.pop() is not None
    assert_broken_alone(pair, "buffer 5 made available while in flight")


def test_chain_takes_the_id_of_its_last_descriptor() -> None:
    pair, raw = _setup()
    buf = write_buffer(pair.mem, b"x")
    raw.desc(buf, 1, NEXT, buffer_id=0xAAAA)  # ids before the last are reserved
    raw.desc(buf, 1, NEXT, buffer_id=0xBBBB)
    raw.desc(buf, 1, 0, buffer_id=7)
    chain = pair.queue.pop()
    assert chain is not None and (chain.head, chain.ndescs, chain.read_all()) == (7, 3, b"xxx")


def test_indirect_entries_ignore_all_flags_but_write() -> None:
    pair, raw = _setup()
    a, b = write_buffer(pair.mem, b"a"), write_buffer(pair.mem, b"b")
    out = write_buffer(pair.mem, bytes(2))
    entries = table((a, 1, 0xFFFF, NEXT), (b, 1, 0, DescFlag.AVAIL), (out, 2, 0, WRITE | NEXT))
    _indirect_table(48, entries)(raw, a)
    chain = pair.queue.pop()
    assert chain is not None and (chain.read_all(), chain.writable_len) == (b"ab", 2)


def test_buffers_span_adjacent_regions() -> None:
    pair, raw = _setup()
    boundary = pair.mem.base + pair.mem.region_size
    pair.mem.write(boundary - 6, b"across-border")
    raw.desc(boundary - 6, 13, NEXT)
    raw.desc(boundary - 3, 6, WRITE, buffer_id=1)
    chain = pair.queue.pop()
    assert chain is not None
    assert [len(v) for v in chain.readable] == [6, 7]
    assert chain.read_all() == b"across-border"
    assert [len(v) for v in chain.writable] == [3, 3]
    pair.queue.push(chain, chain.write_into(b"123456"))
    assert pair.mem.read(boundary - 6, 13) == b"acr123456rder"


@pytest.mark.parametrize("written", [0, 3])
def test_used_descriptor(written: int) -> None:
    pair = make_pair("packed", size=4)
    token = pair.driver.add([b"abc"], [3])
    chain = pair.queue.pop()
    assert chain is not None
    pair.queue.push(chain, chain.write_into(b"xyz"[:written]))
    _, length, buffer_id, flags = DESC.unpack_from(pair.mem.read(pair.driver.desc_addr, 16))
    assert (length, buffer_id) == (written, chain.head)
    assert flags & (DescFlag.AVAIL | DescFlag.USED) == DescFlag.AVAIL | DescFlag.USED
    assert bool(flags & WRITE) == bool(written)
    assert pair.driver.get_used() == [(token, written, [b"xyz"[:written]])]


def test_base_encoding() -> None:
    mem = FakeGuestMemory()
    pair = make_pair("packed", mem=mem)
    assert pair.queue.get_base() == PACKED_INITIAL_BASE == 0x8000_8000
    d = pair.driver
    views = [mem.vva_view(d.desc_addr, 16 * SIZE), mem.vva_view(d.avail_addr, 4)]
    views.append(mem.vva_view(d.used_addr, 4))
    for base in (0x0003_8005, 0x8007_0000, 0):
        assert PackedQueue(mem, 0, SIZE, *views, features=0, base=base).get_base() == base
    for base in (0x0000_0008, 0x0008_0000, 1 << 32, -1):
        with pytest.raises(VirtioError, match="base"):
            PackedQueue(mem, 0, SIZE, *views, features=0, base=base)


def test_base_round_trip_with_chains_in_flight() -> None:
    pair = make_pair("packed", size=4)
    tokens = [pair.driver.add([b"%d" % i], []) for i in range(3)]
    chains = [pair.queue.pop() for _ in tokens]
    assert chains[1] is not None
    pair.queue.push(chains[1], 0)  # one completes, two stay in flight
    base = pair.queue.get_base()
    assert base == (3 | 0x8000) | (1 | 0x8000) << 16
    queue = pair.reopen(base)
    assert queue.pop() is None  # in-flight chains are not offered again
    assert [u.token for u in pair.driver.get_used()] == [tokens[1]]
    token = pair.driver.add([b"new"], [])
    chain = queue.pop()
    assert chain is not None and chain.read_all() == b"new"
    queue.push(chain, 0)
    assert [u.token for u in pair.driver.get_used()] == [token]


def test_odd_queue_sizes_are_allowed() -> None:
    pair = make_pair("packed", size=5)
    for i in range(23):
        token = pair.driver.add([b"%d" % i, b"!"], [])
        chain = pair.queue.pop()
        assert chain is not None and chain.read_all() == b"%d!" % i
        pair.queue.push(chain, 0)
        assert [u.token for u in pair.driver.get_used()] == [token]
