"""Behaviour both ring layouts share, driven by the driver rings of vdev.testing."""

from __future__ import annotations

import pytest

from vdev.testing.driver_rings import RingFullError
from vdev.testing.fakemem import FakeGuestMemory
from vdev.virtio.chain import DescriptorChain
from vdev.virtio.errors import GuestMemoryError, VirtioError
from vdev.virtio.features import TRANSPORT_FEATURES, VirtioFeature
from vdev.virtio.queue import PackedQueue, SplitQueue, make_queue

from .helpers import ALL_FEATURES, make_pair

EVENT_IDX = VirtioFeature.RING_EVENT_IDX


def _serve(chain: DescriptorChain, reply: bytes) -> int:
    return chain.write_into(reply)


def test_make_queue_builds_the_right_layout(kind: str) -> None:
    pair = make_pair(kind)
    assert isinstance(pair.queue, PackedQueue if kind == "packed" else SplitQueue)
    assert (pair.queue.index, pair.queue.size, pair.queue.broken) == (0, 8, False)


def test_simple_chain(kind: str) -> None:
    pair = make_pair(kind)
    token = pair.driver.add([b"re", b"quest"], [4, 8])
    assert pair.queue.has_available()
    chain = pair.queue.pop()
    assert chain is not None
    assert chain.read_all() == b"request"
    assert (chain.readable_len, chain.writable_len) == (7, 12)
    assert pair.queue.pop() is None
    assert pair.queue.in_flight == 1
    pair.queue.push(chain, _serve(chain, b"response"))
    assert pair.queue.in_flight == 0
    assert pair.driver.get_used() == [(token, 8, [b"resp", b"onse"])]
    assert pair.driver.in_flight == 0


def test_readable_only_and_writable_only_chains(kind: str) -> None:
    pair = make_pair(kind)
    t1 = pair.driver.add([b"tx frame"], [])
    t2 = pair.driver.add([], [16])
    c1, c2 = pair.queue.pop(), pair.queue.pop()
    assert c1 is not None and c2 is not None
    assert (c1.writable, c2.readable) == ([], [])
    pair.queue.push(c1, 0)
    pair.queue.push(c2, _serve(c2, b"rx frame"))
    assert pair.driver.get_used() == [(t1, 0, []), (t2, 8, [b"rx frame"])]


def test_indirect_chain(kind: str) -> None:
    pair = make_pair(kind, size=8)
    token = pair.driver.add([b"a", b"b", b"c"], [2, 2, 2], indirect=True)
    chain = pair.queue.pop()
    assert chain is not None
    assert (chain.read_all(), len(chain.writable), chain.ndescs) == (b"abc", 3, 1)
    pair.queue.push(chain, _serve(chain, b"xyzw"))
    assert pair.driver.get_used() == [(token, 4, [b"xy", b"zw", b""])]


def test_out_of_order_completion(kind: str) -> None:
    pair = make_pair(kind, size=16)
    tokens = [pair.driver.add([b"%d" % i] * (i + 1), [4]) for i in range(3)]
    chains = [pair.queue.pop() for _ in range(3)]
    assert all(c is not None for c in chains)
    for i in (2, 0, 1):
        chain = chains[i]
        assert chain is not None
        pair.queue.push(chain, _serve(chain, b"r%d" % i))
    used = pair.driver.get_used()
    assert [(u.token, u.data) for u in used] == [
        (tokens[2], [b"r2"]),
        (tokens[0], [b"r0"]),
        (tokens[1], [b"r1"]),
    ]
    # The ring keeps working after an out-of-order round.
    for _ in range(20):
        token = pair.driver.add([b"x", b"y"], [1])
        chain = pair.queue.pop()
        assert chain is not None
        pair.queue.push(chain, 1)
        assert [u.token for u in pair.driver.get_used()] == [token]


def test_ring_full_and_refill(kind: str) -> None:
    pair = make_pair(kind, size=4)
    tokens = [pair.driver.add([b"x"], []) for _ in range(4)]
    with pytest.raises(RingFullError):
        pair.driver.add([b"x"], [])
    chains = [pair.queue.pop() for _ in range(4)]
    assert pair.queue.pop() is None
    for chain in reversed(chains):
        assert chain is not None
        pair.queue.push(chain, 0)
    assert sorted(u.token for u in pair.driver.get_used()) == tokens
    pair.driver.add([b"again"], [])
    assert pair.queue.pop() is not None


def test_push_validates(kind: str) -> None:
    pair = make_pair(kind)
    pair.driver.add([b"x"], [4])
    chain = pair.queue.pop()
    assert chain is not None
    with pytest.raises(ValueError, match="writable"):
        pair.queue.push(chain, 5)
    pair.queue.push(chain, 4)
    with pytest.raises(ValueError, match="not in flight"):
        pair.queue.push(chain, 0)


@pytest.mark.parametrize("features", [0, EVENT_IDX], ids=["flags", "event_idx"])
def test_kick_suppression(kind: str, features: int) -> None:
    pair = make_pair(kind, features=features)
    assert not pair.driver.kick_needed()  # nothing added
    pair.driver.add([b"1"], [])
    assert pair.driver.kick_needed()
    pair.queue.disable_kicks()
    pair.driver.add([b"2"], [])
    assert not pair.driver.kick_needed()
    for _ in range(2):
        chain = pair.queue.pop()
        assert chain is not None
        pair.queue.push(chain, 0)
    assert not pair.queue.enable_kicks()  # drained: safe to sleep
    pair.driver.add([b"3"], [])
    assert pair.driver.kick_needed()
    pair.queue.disable_kicks()
    pair.driver.add([b"4"], [])
    assert not pair.driver.kick_needed()
    # Buffers that arrived while kicks were off are reported by enable_kicks.
    assert pair.queue.enable_kicks()


def test_event_idx_kicks_only_when_crossing_the_device_event(kind: str) -> None:
    pair = make_pair(kind, features=EVENT_IDX)
    pair.driver.add([b"1"], [])
    assert pair.driver.kick_needed()
    # The device has not popped yet: its event still points at the first buffer,
    # which the driver has already passed, so more buffers need no kick.
    pair.driver.add([b"2"], [])
    assert not pair.driver.kick_needed()
    assert pair.queue.pop() is not None
    assert pair.queue.pop() is not None
    pair.driver.add([b"3"], [])
    assert pair.driver.kick_needed()  # the device caught up and asked again


@pytest.mark.parametrize("features", [0, EVENT_IDX], ids=["flags", "event_idx"])
def test_interrupt_suppression(kind: str, features: int) -> None:
    pair = make_pair(kind, features=features)
    assert not pair.queue.should_notify()  # nothing pushed
    for _ in range(3):
        pair.driver.add([b"x"], [])
    chains = [pair.queue.pop() for _ in range(3)]
    assert all(chains)
    pair.driver.disable_interrupts()
    pair.queue.push(chains[0], 0)  # type: ignore[arg-type]
    assert not pair.queue.should_notify()
    assert pair.driver.enable_interrupts()  # a used buffer is already there
    pair.driver.get_used()
    pair.queue.push(chains[1], 0)  # type: ignore[arg-type]
    assert pair.queue.should_notify()
    assert not pair.queue.should_notify()  # tracking was reset


def test_event_idx_interrupts_only_when_crossing_the_driver_event(kind: str) -> None:
    pair = make_pair(kind, features=EVENT_IDX)
    for _ in range(4):
        pair.driver.add([b"x"], [])
    chains = [pair.queue.pop() for _ in range(4)]
    pair.queue.push(chains[0], 0)  # type: ignore[arg-type]
    assert pair.queue.should_notify()
    # The driver has not consumed the first one: its event is behind us, no interrupt.
    pair.queue.push(chains[1], 0)  # type: ignore[arg-type]
    assert not pair.queue.should_notify()
    assert len(pair.driver.get_used()) == 2  # moves the event to the next used entry
    pair.queue.push(chains[2], 0)  # type: ignore[arg-type]
    pair.queue.push(chains[3], 0)  # type: ignore[arg-type]
    assert pair.queue.should_notify()  # one interrupt for the batch


def test_get_base_round_trip(kind: str) -> None:
    pair = make_pair(kind, size=4)
    for i in range(7):
        token = pair.driver.add([b"q%d" % i, b"-"], [3])
        chain = pair.queue.pop()
        assert chain is not None
        pair.queue.push(chain, _serve(chain, b"a%d" % i))
        assert pair.driver.get_used() == [(token, 2, [b"a%d" % i])]
    base = pair.queue.get_base()
    pair.driver.add([b"pending"], [4])  # added while the device is stopped
    queue = pair.reopen(base)
    assert queue.get_base() == base
    chain = queue.pop()
    assert chain is not None and chain.read_all() == b"pending"
    queue.push(chain, _serve(chain, b"done"))
    assert [u.data for u in pair.driver.get_used()] == [[b"done"]]


def test_wrap_around(kind: str) -> None:
    # Split: the 16-bit indices wrap past 65535. Packed: chains of 3 in a ring of 8
    # straddle the end of the ring and flip both wrap counters many times.
    pair = make_pair(kind, size=8, start_idx=65530)
    total = 0
    for i in range(40):
        tokens = [pair.driver.add([b"%d" % i, b"."], [2]) for _ in range(1 if i % 3 else 2)]
        total += len(tokens)
        chains = [pair.queue.pop() for _ in tokens]
        assert pair.queue.pop() is None
        for chain in reversed(chains):
            assert chain is not None and chain.read_all() == b"%d." % i
            pair.queue.push(chain, _serve(chain, b"ok"))
        assert sorted(u.token for u in pair.driver.get_used()) == tokens
    if kind == "split":
        assert pair.queue.get_base() == (65530 + total) & 0xFFFF
    else:  # 3 descriptors per chain, 8 per lap
        laps, pos = divmod(3 * total, 8)
        wrap = 0x8000 if laps % 2 == 0 else 0
        assert pair.queue.get_base() == (pos | wrap) * 0x10001


def test_queues_share_memory_independently(kind: str) -> None:
    mem = FakeGuestMemory()
    first = make_pair(kind, mem=mem, index=0)
    second = make_pair("packed" if kind == "split" else "split", mem=mem, index=1)
    t1 = first.driver.add([b"one"], [])
    t2 = second.driver.add([b"two"], [])
    c2 = second.queue.pop()
    c1 = first.queue.pop()
    assert c1 is not None and c2 is not None
    assert (c1.read_all(), c2.read_all()) == (b"one", b"two")
    first.queue.push(c1, 0)
    second.queue.push(c2, 0)
    assert [u.token for u in first.driver.get_used()] == [t1]
    assert [u.token for u in second.driver.get_used()] == [t2]


def test_make_queue_errors(kind: str) -> None:
    pair = make_pair(kind)
    d = pair.driver

    def build(size: int = 8, desc: int = d.desc_addr, base: int = d.base) -> None:
        make_queue(
            pair.mem, 0, size, desc, d.avail_addr, d.used_addr, features=d.features, base=base
        )

    with pytest.raises(GuestMemoryError):
        build(desc=0x10)
    with pytest.raises(GuestMemoryError):  # the areas of a bigger queue do not fit
        build(size=32768, desc=pair.mem.end - 0x100)
    for size in (0, 32769) + ((6,) if kind == "split" else ()):
        with pytest.raises(VirtioError, match="size"):
            build(size=size)
    with pytest.raises(VirtioError, match="base"):
        build(base=0x10000 if kind == "split" else 0x80008008)  # packed: position 8 of 8


def test_all_features_are_the_transport_ones() -> None:
    assert ALL_FEATURES | VirtioFeature.VERSION_1 | VirtioFeature.RING_PACKED == TRANSPORT_FEATURES


def test_memfd_memory_with_distinct_user_addresses(kind: str) -> None:
    # Real shared mappings, and ring (user) addresses that differ from guest addresses.
    mem = FakeGuestMemory(1 << 20, regions=2, memfd=True, user_offset=0x7F00_0000_0000)
    pair = make_pair(kind, mem=mem)
    assert pair.driver.desc_addr >= 0x7F00_0000_0000
    token = pair.driver.add([b"over", b" memfd"], [16])
    chain = pair.queue.pop()
    assert chain is not None and chain.read_all() == b"over memfd"
    pair.queue.push(chain, chain.write_into(b"mapped"))
    assert pair.driver.get_used() == [(token, 6, [b"mapped"])]
    del chain
    mem.close()
