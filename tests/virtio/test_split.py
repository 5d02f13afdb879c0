"""Split rings: hostile chains, region spanning, 16-bit wrap-around."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vdev.testing.fakemem import FakeGuestMemory
from vdev.virtio.features import VirtioFeature
from vdev.virtio.layout import DescFlag
from vdev.virtio.ring import MIN_INDIRECT_LIMIT

from .helpers import Pair, RawSplit, assert_broken_alone, make_pair, table, write_buffer

NEXT, WRITE, INDIRECT = DescFlag.NEXT, DescFlag.WRITE, DescFlag.INDIRECT
SIZE = 8


def _setup(features: int = VirtioFeature.RING_INDIRECT_DESC) -> tuple[Pair, RawSplit]:
    pair = make_pair("split", size=SIZE, features=features, mem=FakeGuestMemory(regions=2))
    return pair, RawSplit(pair)


def _loop(raw: RawSplit, buf: int) -> None:
    raw.desc(0, buf, 4, NEXT, 1)
    raw.desc(1, buf, 4, NEXT, 0)
    raw.publish(0)


def _self_loop(raw: RawSplit, buf: int) -> None:
    raw.desc(3, buf, 4, NEXT, 3)
    raw.publish(3)


def _head_beyond_size(raw: RawSplit, buf: int) -> None:
    raw.publish(SIZE)


def _next_beyond_size(raw: RawSplit, buf: int) -> None:
    raw.desc(0, buf, 4, NEXT, SIZE + 1)
    raw.publish(0)


def _avail_idx_jump(raw: RawSplit, buf: int) -> None:
    raw.desc(0, buf, 4)
    raw.publish(0, idx_step=SIZE + 1)


def _address_below_memory(raw: RawSplit, buf: int) -> None:
    raw.desc(0, 0x1000, 4)
    raw.publish(0)


def _length_past_memory(raw: RawSplit, buf: int) -> None:
    raw.desc(0, buf, 0xFFFF_FFFF)
    raw.publish(0)


def _buffer_into_hole(raw: RawSplit, buf: int) -> None:
    raw.desc(0, raw.mem.end - 8, 16, WRITE)
    raw.publish(0)


def _huge_address(raw: RawSplit, buf: int) -> None:
    raw.desc(0, 0xFFFF_FFFF_FFFF_FFF0, 0x100, WRITE)
    raw.publish(0)


def _readable_after_writable(raw: RawSplit, buf: int) -> None:
    raw.desc(0, buf, 4, WRITE | NEXT, 1)
    raw.desc(1, buf, 4)
    raw.publish(0)


def _indirect_with_next(raw: RawSplit, buf: int) -> None:
    tab = write_buffer(raw.mem, table((buf, 4, 0, 0)))
    raw.desc(0, tab, 16, INDIRECT | NEXT, 1)
    raw.desc(1, buf, 4)
    raw.publish(0)


def _indirect_after_direct(raw: RawSplit, buf: int) -> None:
    tab = write_buffer(raw.mem, table((buf, 4, 0, 0)))
    raw.desc(0, buf, 4, NEXT, 1)
    raw.desc(1, tab, 16, INDIRECT)
    raw.publish(0)


def _indirect_table(length: int, entries: bytes = b"") -> Callable[[RawSplit, int], None]:
    def setup(raw: RawSplit, buf: int) -> None:
        tab = write_buffer(raw.mem, entries or bytes(max(length, 16)))
        raw.desc(0, tab, length, INDIRECT)
        raw.publish(0)

    return setup


def _indirect_table_outside_memory(raw: RawSplit, buf: int) -> None:
    raw.desc(0, raw.mem.end - 16, 32, INDIRECT)
    raw.publish(0)


def _nested_indirect(raw: RawSplit, buf: int) -> None:
    inner = write_buffer(raw.mem, table((buf, 4, 0, 0)))
    _indirect_table(16, table((inner, 16, INDIRECT, 0)))(raw, buf)


def _indirect_loop(raw: RawSplit, buf: int) -> None:
    _indirect_table(32, table((buf, 4, NEXT, 1), (buf, 4, NEXT, 0)))(raw, buf)


def _indirect_next_beyond_table(raw: RawSplit, buf: int) -> None:
    _indirect_table(32, table((buf, 4, NEXT, 2), (buf, 4, 0, 0)))(raw, buf)


def _indirect_readable_after_writable(raw: RawSplit, buf: int) -> None:
    _indirect_table(32, table((buf, 4, WRITE | NEXT, 1), (buf, 4, 0, 0)))(raw, buf)


def _indirect_entry_outside_memory(raw: RawSplit, buf: int) -> None:
    _indirect_table(16, table((raw.mem.end, 4, 0, 0)))(raw, buf)


HOSTILE = {
    "loop": (_loop, "longer than the queue"),
    "self-loop": (_self_loop, "longer than the queue"),
    "head-beyond-size": (_head_beyond_size, "head descriptor 8 is beyond"),
    "next-beyond-size": (_next_beyond_size, "chains to 9, beyond the queue"),
    "avail-idx-jump": (_avail_idx_jump, "9 entries ahead"),
    "address-below-memory": (_address_below_memory, "not mapped"),
    "length-past-memory": (_length_past_memory, "not mapped"),
    "buffer-into-hole": (_buffer_into_hole, "not mapped"),
    "huge-address": (_huge_address, "not mapped"),
    "readable-after-writable": (_readable_after_writable, "readable descriptor after"),
    "indirect-with-next": (_indirect_with_next, "must be alone"),
    "indirect-after-direct": (_indirect_after_direct, "must be alone"),
    "indirect-zero-length": (_indirect_table(0), "length 0 is not"),
    "indirect-length-not-multiple-of-16": (_indirect_table(17), "length 17 is not"),
    "indirect-larger-than-limit": (
        _indirect_table(16 * (MIN_INDIRECT_LIMIT + 1)),
        "exceeds the limit",
    ),
    "indirect-table-outside-memory": (_indirect_table_outside_memory, "indirect table: .*mapped"),
    "nested-indirect": (_nested_indirect, "inside an indirect table"),
    "indirect-loop": (_indirect_loop, "longer than its table"),
    "indirect-next-beyond-table": (_indirect_next_beyond_table, "beyond the table"),
    "indirect-readable-after-writable": (_indirect_readable_after_writable, "after a device-w"),
    "indirect-entry-outside-memory": (_indirect_entry_outside_memory, "buffer: .*mapped"),
}


@pytest.mark.parametrize(("setup", "reason"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_chain_breaks_only_its_queue(
    setup: Callable[[RawSplit, int], None], reason: str
) -> None:
    pair, raw = _setup()
    setup(raw, write_buffer(pair.mem, b"data"))
    assert_broken_alone(pair, reason)


def test_indirect_without_the_feature() -> None:
    pair, raw = _setup(features=0)
    buf = write_buffer(pair.mem, b"data")
    _indirect_table(16, table((buf, 4, 0, 0)))(raw, buf)
    assert_broken_alone(pair, "RING_INDIRECT_DESC was not negotiated")


def test_head_already_in_flight() -> None:
    pair, raw = _setup()
    raw.desc(0, write_buffer(pair.mem, b"data"), 4)
    raw.publish(0)
    raw.publish(0)
    assert pair.queue.pop() is not None
    assert_broken_alone(pair, "buffer 0 made available while in flight")


def test_longest_legal_chain_and_table() -> None:
    pair, raw = _setup()
    buf = write_buffer(pair.mem, b"x")
    for i in range(SIZE):
        raw.desc(i, buf, 1, NEXT if i < SIZE - 1 else 0, i + 1)
    raw.publish(0)
    chain = pair.queue.pop()
    assert chain is not None and (chain.read_all(), chain.ndescs) == (b"x" * SIZE, SIZE)
    entries = [(buf, 1, NEXT, i + 1) for i in range(SIZE - 1)] + [(buf, 1, 0, 0)]
    tab = write_buffer(pair.mem, table(*entries))
    raw.desc(1, tab, 16 * SIZE, INDIRECT)
    raw.publish(1)
    chain = pair.queue.pop()
    assert chain is not None and chain.read_all() == b"x" * SIZE


def test_indirect_table_may_chain_out_of_order() -> None:
    pair, raw = _setup()
    a, b = write_buffer(pair.mem, b"a"), write_buffer(pair.mem, b"b")
    # The chain starts at entry 0 and follows `next`: 0 -> 2 -> 1.
    tab = write_buffer(pair.mem, table((a, 1, NEXT, 2), (b, 1, 0, 0), (a, 1, NEXT, 1)))
    raw.desc(0, tab, 48, INDIRECT)
    raw.publish(0)
    chain = pair.queue.pop()
    assert chain is not None and chain.read_all() == b"aab"


def test_buffers_span_adjacent_regions() -> None:
    pair, raw = _setup()
    boundary = pair.mem.base + pair.mem.region_size
    pair.mem.write(boundary - 6, b"across-border")
    raw.desc(0, boundary - 6, 13, NEXT, 1)
    raw.desc(1, boundary - 3, 6, WRITE)
    raw.publish(0)
    chain = pair.queue.pop()
    assert chain is not None
    assert [len(v) for v in chain.readable] == [6, 7]
    assert chain.read_all() == b"across-border"
    assert [len(v) for v in chain.writable] == [3, 3]
    assert pair.mem.locate(chain.writable[1]) == (1, 0)
    pair.queue.push(chain, chain.write_into(b"123456"))
    assert pair.mem.read(boundary - 6, 13) == b"acr123456rder"


def test_zero_length_buffers_are_empty() -> None:
    pair, raw = _setup()
    raw.desc(0, 0, 0, NEXT, 1)  # even at an unmapped address: nothing to access
    raw.desc(1, write_buffer(pair.mem, b""), 0, WRITE)
    raw.publish(0)
    chain = pair.queue.pop()
    assert chain is not None and (chain.readable, chain.writable) == ([], [])
    pair.queue.push(chain, 0)


def test_used_index_is_read_from_the_ring() -> None:
    pair = make_pair("split", size=4, start_idx=0xFFFE)
    token = pair.driver.add([b"x"], [])
    chain = pair.queue.pop()
    assert chain is not None
    pair.queue.push(chain, 0)
    assert [u.token for u in pair.driver.get_used()] == [token]
    assert pair.queue.get_base() == 0xFFFF


def test_runs_past_65535() -> None:
    pair = make_pair("split", size=4, features=VirtioFeature.RING_EVENT_IDX)
    for i in range(66_000):
        token = pair.driver.add([b"r"], [1])
        if i % 1000 == 0:
            pair.driver.kick_needed()
        chain = pair.queue.pop()
        assert chain is not None
        pair.queue.push(chain, 1)
        pair.queue.should_notify()
        [used] = pair.driver.get_used()
        assert used.token == token
    assert pair.queue.get_base() == 66_000 & 0xFFFF
