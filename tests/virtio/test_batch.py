"""The batch ring API on both layouts: pop many, fill each, publish once; a hostile
chain inside a batch breaks only its queue, after the good chains before it."""

from __future__ import annotations

import pytest

from vdev.testing.fakemem import FakeGuestMemory
from vdev.virtio.layout import DESC, DESC_SIZE

from .helpers import KINDS, Pair, make_pair

BAD_LENGTH = 77


def corrupt(pair: Pair, length: int) -> None:
    """Point the descriptor of `length` bytes outside guest memory (what a hostile
    driver writes)."""
    for index in range(pair.driver.size):
        offset = pair.driver.desc_addr + DESC_SIZE * index
        _, found, a, b = DESC.unpack(pair.mem.read(offset, DESC_SIZE))
        if found == length:
            pair.mem.write(offset, DESC.pack(pair.mem.end + 4096, length, a, b))
            return
    raise AssertionError("descriptor not found")


@pytest.mark.parametrize("kind", KINDS)
def test_fill_is_invisible_until_flush_publishes_the_batch(kind: str) -> None:
    pair = make_pair(kind, size=16)
    tokens = [pair.driver.add([b"req%d" % i], [8]) for i in range(5)]
    chains = pair.queue.pop_batch(16)
    assert [c.read_all() for c in chains] == [b"req%d" % i for i in range(5)]
    for chain in reversed(chains):  # any order
        pair.queue.fill(chain, chain.write_into(b"done"))
    assert pair.driver.get_used() == []
    pair.queue.flush()
    assert sorted(u.token for u in pair.driver.get_used()) == tokens


@pytest.mark.parametrize("kind", KINDS)
def test_batches_wrap_around_the_ring(kind: str) -> None:
    pair = make_pair(kind, size=16)
    for lap in range(5):
        tokens = [pair.driver.add([bytes([lap, i])], [2]) for i in range(6)]
        chains = pair.queue.pop_batch(6)
        assert [c.read_all() for c in chains] == [bytes([lap, i]) for i in range(6)]
        for chain in chains:
            pair.queue.fill(chain, chain.write_into(b"ok"))
        pair.queue.flush()
        assert [u.token for u in pair.driver.get_used()] == tokens


@pytest.mark.parametrize("kind", KINDS)
def test_a_hostile_chain_in_a_batch_breaks_only_its_queue(kind: str) -> None:
    pair = make_pair(kind, size=16)
    good = [pair.driver.add([b"good%d" % i], [8]) for i in range(2)]
    pair.driver.add([b"x" * BAD_LENGTH], [8])
    pair.driver.add([b"late"], [8])
    corrupt(pair, BAD_LENGTH)
    chains = pair.queue.pop_batch(8)
    assert [c.read_all() for c in chains] == [b"good0", b"good1"]
    assert pair.queue.broken and "not mapped" in str(pair.queue.failure)
    for chain in chains:  # what was taken before the bad chain still completes
        pair.queue.fill(chain, 0)
    pair.queue.flush()
    assert [u.token for u in pair.driver.get_used()] == good
    assert pair.queue.pop_batch(8) == [] and pair.queue.pop() is None
    other = make_pair(kind, mem=pair.mem, index=1)
    token = other.driver.add([b"other"], [8])
    [chain] = other.queue.pop_batch(8)
    other.queue.push(chain, chain.write_into(b"fine"))
    assert other.driver.get_used() == [(token, 4, [b"fine"])]


@pytest.mark.parametrize("kind", KINDS)
def test_an_indirect_table_of_128_fits_a_64_entry_ring(kind: str) -> None:
    """Linux builds tables of seg_max + 2 = 128 descriptors whatever the queue size."""
    pair = make_pair(kind, size=64, mem=FakeGuestMemory(4 << 20))
    parts = [bytes([i]) * 16 for i in range(127)]
    token = pair.driver.add(parts, [1], indirect=True)
    [chain] = pair.queue.pop_batch(8)
    assert chain.read_all() == b"".join(parts) and chain.writable_len == 1
    pair.queue.push(chain, chain.write_into(b"\0"))
    assert [u.token for u in pair.driver.get_used()] == [token]
