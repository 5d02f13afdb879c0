"""The virtio-blk hot path the benchmark tuned: requests grouped per hop, several hops
in flight for a backend that allows it, each completing as soon as its hop returns."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
from vdev_backends.blk_ram import RamBackend

from vdev.devices.blk import MIN_GROUP_BYTES, REQUEST_HEADER, BlkDevice, BlkFeature, RequestType
from vdev.virtio.chain import DescriptorChain

KiB = 1 << 10
SIZE = 8 << 20


@dataclass
class Queue:
    """A `Queue` over prepared chains; records completions in order."""

    index: int = 0
    pending: list[DescriptorChain] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)
    notifies: int = 0

    def pop(self) -> DescriptorChain | None:
        return self.pending.pop(0) if self.pending else None

    def push(self, chain: DescriptorChain, written: int) -> None:
        self.completed.append(chain.head)

    def notify(self) -> None:
        self.notifies += 1


def read_chain(head: int, sector: int, length: int) -> DescriptorChain:
    header = memoryview(bytearray(REQUEST_HEADER.pack(RequestType.IN, 0, sector)))
    return DescriptorChain(head, [header], [memoryview(bytearray(length + 1))])


class Slow(RamBackend):
    """Reads at sector 0 wait for `release`; counts calls running at once."""

    def __init__(self, lanes: int) -> None:
        super().__init__(SIZE)
        self.max_concurrency = lanes
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.running = self.peak = self.calls = 0

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        with self._lock:
            self.running += 1
            self.calls += 1
            self.peak = max(self.peak, self.running)
        self.started.release()
        try:
            if offset == 0:
                assert self.release.wait(10), "never released"
            else:
                time.sleep(0.05)
            super().read(offset, buffers)
        finally:
            with self._lock:
                self.running -= 1


def device(backend: RamBackend) -> BlkDevice:
    dev = BlkDevice(backend)
    dev.set_features(BlkFeature.FLUSH)
    return dev


async def test_a_finished_hop_completes_while_another_is_blocked() -> None:
    backend = Slow(lanes=2)
    q = Queue(pending=[read_chain(1, 0, MIN_GROUP_BYTES), read_chain(2, 1024, MIN_GROUP_BYTES)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device(backend).handle, q)
        with trio.fail_after(10):
            while q.completed != [2]:
                await trio.sleep(0.01)
        backend.release.set()
    assert q.completed == [2, 1] and q.notifies == 2
    backend.close()


async def test_large_requests_run_side_by_side_up_to_the_backend_limit() -> None:
    backend = Slow(lanes=3)
    backend.release.set()
    q = Queue(pending=[read_chain(i, 1024 * i, MIN_GROUP_BYTES) for i in range(1, 10)])
    with trio.fail_after(10):
        await device(backend).handle(q)
    assert sorted(q.completed) == list(range(1, 10))
    assert backend.calls == 9 and backend.peak == 3
    backend.close()


async def test_small_requests_share_a_hop() -> None:
    backend = RamBackend(SIZE)
    backend.max_concurrency = 4  # type: ignore[attr-defined]
    dev = device(backend)
    hops: list[int] = []

    async def counting(index: int, work):  # type: ignore[no-untyped-def]
        hops.append(index)
        return work()

    dev.offload = counting
    per_group = MIN_GROUP_BYTES // (4 * KiB)
    q = Queue(pending=[read_chain(i, 8 * i, 4 * KiB) for i in range(per_group + 3)])
    await dev.handle(q)
    assert len(q.completed) == per_group + 3
    assert len(hops) == 2 and q.notifies == 2  # one full group, then the rest
    backend.close()


async def test_one_lane_leaves_the_rest_in_the_ring_until_it_is_free() -> None:
    backend = Slow(lanes=1)
    q = Queue(pending=[read_chain(1, 0, MIN_GROUP_BYTES), read_chain(2, 1024, MIN_GROUP_BYTES)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device(backend).handle, q)
        await trio.to_thread.run_sync(backend.started.acquire)
        await trio.sleep(0.1)
        assert [c.head for c in q.pending] == [2]  # not taken while the only hop is busy
        backend.release.set()
    assert q.completed == [1, 2] and backend.peak == 1
    backend.close()
