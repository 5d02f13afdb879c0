"""BlkDevice over real split and packed virtqueues in (fake, memfd-backed) guest memory."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from blk_helpers import SECTOR, header, segments
from vdev_backends.blk_file import FileBackend

from vdev.devices.blk import BlkDevice, BlkFeature, RequestType, Status
from vdev.devices.blk_requests import BlkRequest, InlineExecutor
from vdev.testing.driver_rings import DriverPackedRing, DriverSplitRing, UsedBuffer
from vdev.testing.fakemem import FakeGuestMemory
from vdev.virtio.chain import DescriptorChain
from vdev.virtio.features import VirtioFeature
from vdev.virtio.queue import Virtqueue, make_queue

MiB = 1 << 20
SIZE = 8 * MiB
RING_FEATURES = (
    VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX | VirtioFeature.RING_INDIRECT_DESC
)


class RingQueue:
    """The device's `Queue` over a `Virtqueue` (what `vdev.vring.Vring` does, minus fds)."""

    def __init__(self, ring: Virtqueue) -> None:
        self.ring = ring
        self.index = ring.index
        self.size = ring.size
        self.interrupts = 0

        self.counters: dict[str, int] = {}
        self.publishes = 0

    def pop_batch(self, limit: int) -> list[DescriptorChain]:
        return self.ring.pop_batch(limit)

    def pop(self) -> DescriptorChain | None:
        return self.ring.pop()

    def fill(self, chain: DescriptorChain, written: int) -> None:
        self.ring.fill(chain, written)

    def flush(self) -> None:
        self.publishes += 1
        self.ring.flush()

    def push(self, chain: DescriptorChain, written: int) -> None:
        self.ring.push(chain, written)

    def notify(self) -> None:
        self.flush()
        self.interrupts += self.ring.should_notify()

    def wake(self) -> None:
        pass


class Setup:
    def __init__(self, layout: str, indirect: bool, backend: FileBackend) -> None:
        self.mem = FakeGuestMemory(16 * MiB, regions=2, memfd=True)
        features = RING_FEATURES | (VirtioFeature.RING_PACKED if layout == "packed" else 0)
        cls = DriverPackedRing if layout == "packed" else DriverSplitRing
        self.driver = cls(self.mem, 128, features=features)
        self.indirect = indirect
        vq = make_queue(
            self.mem,
            0,
            self.driver.size,
            self.driver.desc_addr,
            self.driver.avail_addr,
            self.driver.used_addr,
            features=features,
            base=self.driver.base,
        )
        self.queue = RingQueue(vq)
        self.device = BlkDevice(backend)
        self.device.set_features(features | BlkFeature.FLUSH | BlkFeature.DISCARD)

    def add(self, readable: list[bytes], writable: list[int]) -> int:
        return self.driver.add(readable, writable, indirect=self.indirect)

    async def run(self) -> dict[int, UsedBuffer]:
        self.device.start_queue(self.queue)
        while self.queue.ring.has_available():
            self.device.handle(self.queue)
        return {u.token: u for u in self.driver.get_used()}


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[FileBackend]:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
    backend = FileBackend(path, serial="ring-disk")
    yield backend
    backend.close()


@pytest.fixture(params=["split", "packed"])
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def status(used: UsedBuffer) -> int:
    return used.last_byte


@pytest.mark.parametrize("indirect", [False, True])
async def test_requests_over_a_ring(disk: FileBackend, layout: str, indirect: bool) -> None:
    s = Setup(layout, indirect, disk)
    data = os.urandom(16 * 4096)
    pages = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    write = s.add([header(RequestType.OUT, 64), *pages], [1])
    flush = s.add([header(RequestType.FLUSH)], [1])
    read = s.add([header(RequestType.IN, 64)], [4096] * 16 + [1])
    get_id = s.add([header(RequestType.GET_ID)], [20, 1])
    used = await s.run()
    assert [status(used[t]) for t in (write, flush, read, get_id)] == [Status.OK] * 4
    assert b"".join(used[read].data)[:-1] == data
    assert used[read].written == len(data) + 1
    assert used[get_id].data[0] == b"ring-disk" + bytes(11)
    assert s.queue.interrupts == 1

    zero = s.add([header(RequestType.WRITE_ZEROES), segments((64, 8, 1))], [1])
    discard = s.add([header(RequestType.DISCARD), segments((72, 8, 0), (200, 8, 0))], [1])
    bad = s.add([header(RequestType.IN, SIZE // SECTOR)], [SECTOR, 1])
    reread = s.add([header(RequestType.IN, 64)], [8 * SECTOR, 1])
    used = await s.run()
    assert [status(used[t]) for t in (zero, discard, bad, reread)] == [0, 0, Status.IOERR, 0]
    assert used[reread].data[0] == bytes(8 * SECTOR)
    stats = s.device.stats()
    assert stats["requests"] == 8 and stats["errors"] == 1
    assert stats["bytes_written"] == len(data)


async def test_a_full_ring_is_one_batch(disk: FileBackend, layout: str) -> None:
    s = Setup(layout, False, disk)
    runs: list[int] = []

    class Counting(InlineExecutor):
        def run(self, requests: Sequence[BlkRequest]) -> None:
            runs.append(len(requests))
            super().run(requests)

    s.device.executor_factory = lambda index: Counting(disk)
    count = 42  # three descriptors each: the 128-entry ring is full
    tokens = [s.add([header(RequestType.OUT, i), bytes([i]) * SECTOR], [1]) for i in range(count)]
    used = await s.run()
    assert len(used) == count and all(status(used[t]) == 0 for t in tokens)
    assert runs == [count] and s.queue.interrupts == 1 and s.queue.publishes == 1
    check = s.add([header(RequestType.IN, 0)], [count * SECTOR, 1])
    used = await s.run()
    assert used[check].data[0] == b"".join(bytes([i]) * SECTOR for i in range(count))
