"""The channel on its own: its layout, the core's driver ring against vdev.virtio's
SplitQueue (the child's side), the bounce arena, and control messages."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdev.devices.blk_requests import RequestType
from vdev.domain import control
from vdev.domain.channel import (
    CHANNEL_GPA,
    REQUEST,
    RESULT,
    Arena,
    Channel,
    ChannelError,
    RingLayout,
    check_layout,
    copy_views,
    plan,
)
from vdev.virtio.layout import DescFlag, split_ring_sizes
from vdev.virtio.memory import GuestMemory
from vdev.virtio.split import SplitQueue


class ChildSide:
    """What the child maps: the channel memfd in a GuestMemory, a SplitQueue per ring."""

    def __init__(self, channel: Channel) -> None:
        self.memory = GuestMemory()
        self.memory.add_region(CHANNEL_GPA, channel.size, CHANNEL_GPA, 0, channel.fd)

    def queue(self, layout: RingLayout, base: int = 0) -> SplitQueue:
        desc_len, avail_len, used_len = split_ring_sizes(layout.size)
        view = self.memory.gpa_view
        return SplitQueue(
            self.memory,
            0,
            layout.size,
            view(CHANNEL_GPA + layout.desc, desc_len),
            view(CHANNEL_GPA + layout.avail, avail_len),
            view(CHANNEL_GPA + layout.used, used_len),
            features=0,
            base=base,
        )


@pytest.fixture
def channel() -> Channel:
    chan = Channel([(8, 4096, 0), (16, 3 * 4096, 4)])
    yield chan
    chan.close()


def test_layout_is_disjoint_and_checked() -> None:
    layouts, total = plan([(256, 1 << 20, 128), (1024, 4 << 20, 0), (8, 4096, 2)])
    pieces = []
    for layout in layouts:
        desc, avail, used = split_ring_sizes(layout.size)
        pieces += [
            (layout.desc, desc),
            (layout.avail, avail),
            (layout.used, used),
            (layout.slots, (32 + 16 * layout.table_segments) * layout.size),
            (layout.bounce, layout.bounce_len),
        ]
    pieces.sort()
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(pieces))
    assert pieces[-1][0] + pieces[-1][1] <= total and total % 4096 == 0
    check_layout(layouts, total)
    with pytest.raises(ValueError, match="exceeds"):
        check_layout(layouts, total - 4096)
    assert RingLayout.from_wire(layouts[1].to_wire()) == layouts[1]
    with pytest.raises(ValueError):
        RingLayout.from_wire([1, 2, 3])


def test_memfd_is_sealed(channel: Channel) -> None:
    with pytest.raises(PermissionError):
        os.ftruncate(channel.fd, 4096)


def test_chains_cross_and_come_back(channel: Channel) -> None:
    ring = channel.rings[1]
    child = ChildSide(channel).queue(ring.layout)
    ring.bounce[:5] = b"hello"
    head = ring.ring.add(
        [(ring.bounce_gpa(0), 5, 0), (ring.bounce_gpa(4096), 100, DescFlag.WRITE)], "token"
    )
    assert ring.ring.kick_needed()  # the child sleeps with notifications on
    chain = child.pop()
    assert chain is not None and chain.head == head
    assert bytes(chain.readable[0]) == b"hello"
    chain.write_into(b"world")
    child.push(chain, 5)
    assert ring.ring.take_used() == ("token", 5)
    assert bytes(ring.bounce[4096:4101]) == b"world"
    assert ring.ring.take_used() is None and ring.ring.free == 16


def test_a_request_slot_holds_header_table_and_result(channel: Channel) -> None:
    ring = channel.rings[1]
    child = ChildSide(channel).queue(ring.layout)
    refs = [0x1000, 256, 0x2000, 512]
    first, last = ring.request(ring.ring.next_head(), RequestType.IN, 1, 4096, 768, refs)
    head = ring.ring.add([first, last], "r")
    chain = child.pop()
    assert chain is not None and chain.head == head
    [header], [result] = chain.readable, chain.writable
    assert REQUEST.unpack_from(header) == (RequestType.IN, 1, 2, 4096, 768)
    assert list(header[REQUEST.size :].cast("Q")) == refs
    RESULT.pack_into(result, 0, 5, 0)
    child.push(chain, RESULT.size)
    assert ring.ring.take_used() == ("r", RESULT.size) and ring.result(head) == 5


def test_indices_wrap_around(channel: Channel) -> None:
    ring = channel.rings[0]
    child = ChildSide(channel).queue(ring.layout)
    for n in range(70_000):
        ring.ring.add([(ring.bounce_gpa(0), 8, 0)] * 3, n)
        chain = child.pop()
        assert chain is not None
        child.push(chain, 0)
        assert ring.ring.take_used() == (n, 0)


def test_a_new_child_redoes_what_the_dead_one_left(channel: Channel) -> None:
    ring = channel.rings[0]
    side = ChildSide(channel)
    dead = side.queue(ring.layout)
    for n in range(3):
        ring.ring.add([(ring.bounce_gpa(8 * n), 8, DescFlag.WRITE)], n)
    first = dead.pop()
    second = dead.pop()
    assert first is not None and second is not None
    dead.push(first, 0)  # done; the second was taken and never finished
    assert ring.ring.rewind() == 2
    new = side.queue(ring.layout, base=1)  # the child starts at the used index
    assert [new.pop().head for _ in range(2)] == [second.head, 2]  # type: ignore[union-attr]
    assert ring.ring.take_used() == (0, 0)


def test_unfinished_chains_can_be_dropped_instead(channel: Channel) -> None:
    ring = channel.rings[0]
    side = ChildSide(channel)
    dead = side.queue(ring.layout)
    for n in range(3):
        ring.ring.add([(ring.bounce_gpa(8 * n), 8, DescFlag.WRITE)], n)
    assert dead.pop() is not None
    assert ring.ring.rewind(drop=True) == 3
    assert side.queue(ring.layout, base=3).pop() is None
    assert [ring.ring.take_used() for _ in range(3)] == [(0, 0), (1, 0), (2, 0)]
    assert ring.ring.free == ring.ring.size


def test_implausible_used_index_is_refused_and_rewound(channel: Channel) -> None:
    """A child gone mad writes its used ring: the core refuses what makes no sense."""
    ring = channel.rings[0]
    used = ChildSide(channel).memory.gpa_view(CHANNEL_GPA + ring.layout.used, 12)
    used_idx = used[2:4].cast("H")
    ring.ring.add([(ring.bounce_gpa(0), 8, 0)], "a")
    used_idx[0] = 40
    with pytest.raises(ChannelError, match="ran ahead"):
        ring.ring.take_used()
    assert ring.ring.rewind() == 1 and used_idx[0] == 0
    used[4:8] = (7).to_bytes(4, "little")  # a head that is not in flight
    used_idx[0] = 1
    with pytest.raises(ChannelError, match="not in flight"):
        ring.ring.take_used()


@given(st.lists(st.integers(1, 3 * 4096), min_size=1, max_size=60))
def test_arena_hands_out_disjoint_aligned_space_in_order(sizes: list[int]) -> None:
    arena = Arena(4 * 4096)
    live: list[tuple[list[tuple[int, int]], int]] = []
    for size in sizes:
        got = arena.alloc(size)
        while got is None:
            assert live, f"{size} bytes refused with nothing allocated"
            arena.release(live.pop(0)[1])
            got = arena.alloc(size)
        pieces, _ = got
        assert sum(n for _, n in pieces) == size and len(pieces) <= 2
        assert all(o % 4096 == 0 and o + n <= 4 * 4096 for o, n in pieces)
        live.append(got)
        used = sorted((o, o + n) for p, _ in live for o, n in p)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(used))


def test_copy_views_across_scatter_lists() -> None:
    src = [memoryview(b"abc"), memoryview(b""), memoryview(b"defgh")]
    dst = [memoryview(bytearray(2)), memoryview(bytearray(6))]
    copy_views(dst, src)
    assert b"".join(bytes(v) for v in dst) == b"abcdefgh"


def test_control_messages_carry_fds() -> None:
    ours, theirs = control.socketpair()
    with ours, theirs:
        fd = os.eventfd(5)
        control.send(ours, {"op": "hello", "n": [1, 2]}, [fd])
        os.close(fd)
        message, fds = control.receive(theirs, 1)
        assert message == {"op": "hello", "n": [1, 2]}
        assert os.eventfd_read(fds[0]) == 5
        control.close_fds(fds)
        theirs.send(b"\xff not json")
        with pytest.raises(control.ControlError, match="malformed"):
            control.receive(ours, 1)
        theirs.send(b'["no op"]')
        with pytest.raises(control.ControlError, match="malformed"):
            control.receive(ours, 1)
        with pytest.raises(control.ControlError, match="no answer"):
            control.receive(ours, 0.01)
        abort = os.eventfd(1)
        with pytest.raises(control.ControlError, match="aborted"):
            control.receive(ours, 1, abort_fds=[abort])
        os.close(abort)
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(control.ControlError, match="closed"):
            control.receive(ours, 1)
