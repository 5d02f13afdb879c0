"""In-flight tracking (INFLIGHT_SHMFD): a queue owner killed between any two of its
stores leaves a region from which the next owner re-submits exactly the requests that
were taken and not completed, in order, and none the driver already got back."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from vdev.testing.fakemem import FakeGuestMemory
from vdev.virtio.chain import DescriptorChain
from vdev.virtio.errors import VirtioError
from vdev.virtio.inflight import InflightBuffer, queue_region_size
from vdev.virtio.queue import Virtqueue

from .helpers import KINDS, Pair, device_queue, make_pair

QUEUE_SIZE = 8
REQUESTS = 14


class Crash(Exception):
    """The owner of the queue died here."""


class Stores:
    """Counts the stores that matter for recovery and raises `Crash` before one."""

    def __init__(self, crash_at: int | None) -> None:
        self.count = 0
        self.crash_at = crash_at

    def hit(self) -> None:
        self.count += 1
        if self.count == self.crash_at:
            raise Crash


class Recorded:
    """A memoryview whose item stores go through `Stores`."""

    def __init__(self, view: Any, stores: Stores) -> None:
        self._view, self._stores = view, stores

    def __getitem__(self, key: Any) -> Any:
        return self._view[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._stores.hit()
        self._view[key] = value


def instrument(queue: Virtqueue, stores: Stores) -> None:
    """Route the region's stores and the ring's publishing stores through `stores`."""
    region = queue._inflight._r  # type: ignore[union-attr]
    for name in ("u8", "u16", "u32", "u64"):
        setattr(region, name, Recorded(getattr(region, name), stores))
    for name in ("_used_idx_field", "_desc_u16"):  # split used.idx, packed flags
        if hasattr(queue, name):
            setattr(queue, name, Recorded(getattr(queue, name), stores))


def open_queue(pair: Pair, buffer: InflightBuffer) -> Virtqueue:
    """A new owner of the queue, told a stale base as QEMU does after a crash."""
    return device_queue(pair.mem, pair.driver, base=pair.driver.base, inflight=buffer.region(0))


class Owner:
    """The process serving the queue: takes batches, completes them out of order."""

    def __init__(self, queue: Virtqueue, rng: random.Random) -> None:
        self.queue, self.rng = queue, rng
        self.pending: list[DescriptorChain] = []

    def complete(self, chains: list[DescriptorChain]) -> None:
        for chain in chains:
            self.pending.remove(chain)
            self.queue.fill(chain, chain.write_into(b"re:" + chain.read_all()))
        self.queue.flush()

    def serve(self) -> None:
        """Take a batch, complete a random part of what is in flight."""
        self.pending += self.queue.pop_batch(self.rng.randint(1, 4))
        self.rng.shuffle(self.pending)
        self.complete(self.pending[: self.rng.randint(0, len(self.pending))])
        if not self.queue.has_available():
            self.complete(list(self.pending))


def run(kind: str, crash_at: int | None, seed: int) -> tuple[Counter[bytes], int, int]:
    """The workload, killed before store `crash_at`: (completions per request, stores
    run, chains the successor re-submitted)."""
    rng = random.Random(seed)
    pair = make_pair(kind, size=QUEUE_SIZE, mem=FakeGuestMemory(1 << 20))
    buffer = InflightBuffer.create(1, QUEUE_SIZE)
    owner = Owner(open_queue(pair, buffer), rng)
    stores = Stores(crash_at)
    instrument(owner.queue, stores)
    completed: Counter[bytes] = Counter()
    submitted = 0
    while submitted < REQUESTS or pair.driver.in_flight:
        while submitted < REQUESTS and pair.driver.in_flight < QUEUE_SIZE // 2:
            pair.driver.add([b"req%02d" % submitted], [16])
            submitted += 1
        try:
            owner.serve()
        except Crash:
            owner = Owner(open_queue(pair, buffer), rng)  # what it held is gone
        for used in pair.driver.get_used():
            reply = b"".join(used.data)
            assert reply.startswith(b"re:"), reply
            completed[reply[3:]] += 1
    return completed, stores.count, owner.queue.resubmitted


@pytest.mark.parametrize("kind", KINDS)
def test_a_crash_between_any_two_stores_is_recovered_exactly(kind: str) -> None:
    expected = Counter(b"req%02d" % i for i in range(REQUESTS))
    for seed in range(3):
        completed, total, _ = run(kind, None, seed)
        assert completed == expected
        resubmissions = 0
        for crash_at in range(1, total + 1):
            completed, _, resubmitted = run(kind, crash_at, seed)
            assert completed == expected, (seed, crash_at)  # none lost, none twice
            resubmissions += resubmitted
        assert resubmissions > total // 4  # most crash points had requests in flight


@pytest.mark.parametrize("kind", KINDS)
def test_resubmitted_requests_come_first_in_their_original_order(kind: str) -> None:
    pair = make_pair(kind, size=16, mem=FakeGuestMemory(1 << 20))
    buffer = InflightBuffer.create(1, 16)
    queue = open_queue(pair, buffer)
    for i in range(6):
        pair.driver.add([b"r%d" % i], [8])
    chains = queue.pop_batch(6)
    for chain in (chains[1], chains[4]):  # out of order
        queue.fill(chain, chain.write_into(b"ok"))
    queue.flush()
    pair.driver.add([b"new"], [8])
    successor = open_queue(pair, buffer)
    again = successor.pop_batch(8)
    assert [c.read_all() for c in again] == [b"r0", b"r2", b"r3", b"r5", b"new"]
    assert successor.resubmitted == 4


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_region_starts_where_the_base_says(kind: str) -> None:
    pair = make_pair(kind, size=QUEUE_SIZE)
    buffer = InflightBuffer.create(1, QUEUE_SIZE)
    token = pair.driver.add([b"x"], [4])
    queue = open_queue(pair, buffer)
    [chain] = queue.pop_batch(4)
    queue.push(chain, chain.write_into(b"done"))
    assert [u.token for u in pair.driver.get_used()] == [token]
    assert open_queue(pair, buffer).pop_batch(4) == []  # nothing left in flight


def test_a_region_too_small_for_the_queue_is_refused() -> None:
    buffer = InflightBuffer.create(2, 4)
    assert buffer.region(1).nbytes == queue_region_size(4)
    pair = make_pair("split", size=16)
    with pytest.raises(VirtioError, match="in-flight region"):
        device_queue(pair.mem, pair.driver, base=0, inflight=buffer.region(0))
    with pytest.raises(VirtioError, match="no in-flight region"):
        buffer.region(2)
