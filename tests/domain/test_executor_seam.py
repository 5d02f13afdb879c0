"""The executor seam: one set of block requests, failures included, through every
executor (inline, I/O threads, Linux AIO on O_DIRECT, driver domain with `map` and with
`copy`): the same statuses, the same data, the same image."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from domain_helpers import IMAGE_SIZE, SECTOR, blk_in_domain
from vdev_backends.blk_file import FileBackend

from vdev.devices import aio
from vdev.devices.blk_requests import (
    BlkRequest,
    Executor,
    InlineExecutor,
    PoolExecutor,
    Range,
    RequestType,
    Status,
)
from vdev.testing.fakemem import FakeGuestMemory
from vdev.virtio.chain import DescriptorChain

#: Where the image ends once it has shrunk under the device (reads past it fail).
SHRUNK = IMAGE_SIZE // 2
BIG = 3 << 20  # larger than a copy-mode bounce quarter: cut in several ring requests


class Guest:
    """Guest memory and chains shaped as a driver builds them (header, data, status)."""

    def __init__(self) -> None:
        self.mem = FakeGuestMemory(32 << 20, memfd=True)

    def request(self, kind: int, offset: int, data: bytes | int) -> BlkRequest:
        """A request whose data lives in guest memory, with the chain it came from."""
        header = self.mem.alloc(16)
        length = data if isinstance(data, int) else len(data)
        buf = self.mem.alloc(length, align=4096)
        if not isinstance(data, int):
            self.mem.write(buf, data)
        status = self.mem.alloc(1)
        view = self.mem.gpa_view(buf, length)
        if kind == RequestType.IN:
            chain = DescriptorChain(0, [], [view], 1, [header, 16, buf, length, status, 1], 1)
        else:
            chain = DescriptorChain(0, [view], [], 1, [header, 16, buf, length, status, 1], 2)
        return BlkRequest(kind, offset, [view], length, chain=chain)

    def requests(self) -> list[BlkRequest]:
        data = bytes(range(256)) * 32  # 8 KiB
        big = os.urandom(BIG)
        return [
            self.request(RequestType.OUT, 0, data),
            self.request(RequestType.OUT, 64 * SECTOR, big),
            self.request(RequestType.IN, 0, len(data)),
            self.request(RequestType.IN, SHRUNK, 4 * SECTOR),  # past the end: IOERR
            self.request(RequestType.IN, 64 * SECTOR, BIG),
            BlkRequest(RequestType.FLUSH),
            BlkRequest(RequestType.WRITE_ZEROES, ranges=(Range(8 * SECTOR, 8 * SECTOR, False),)),
            BlkRequest(RequestType.DISCARD, ranges=(Range(16 * SECTOR, 8 * SECTOR, False),)),
            self.request(RequestType.IN, 8 * SECTOR, 8 * SECTOR),
        ]


EXPECTED = [Status.OK, Status.OK, Status.OK, Status.IOERR, Status.OK] + [Status.OK] * 4


@pytest.fixture(params=["inline", "pool", "aio", "domain-map", "domain-copy"])
def executor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Executor, Guest]]:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xaa" * IMAGE_SIZE)
    guest = Guest()
    kind = request.param
    if kind.startswith("domain"):
        device = blk_in_domain(
            tmp_path / "d.sock", "file", {"path": str(image)}, memory=kind.removeprefix("domain-")
        )
        device.backend.memory_changed(guest.mem)
        executor: Executor = device.backend.executor(0)
        closer = device.close
    elif kind == "aio":
        backend = FileBackend(image, direct=True)
        assert backend.direct_fd is not None and aio.available()
        executor = aio.AioExecutor(backend, backend.direct_fd)
        closer = backend.close
    else:
        backend = FileBackend(image)
        executor = InlineExecutor(backend) if kind == "inline" else PoolExecutor(backend, 4, 0)
        closer = backend.close
    os.truncate(image, SHRUNK)  # shrinks under the backend
    yield executor, guest
    executor.close()
    closer()
    guest.mem.close()


def test_every_executor_gives_the_same_statuses_and_data(
    executor: tuple[Executor, Guest],
) -> None:
    run, guest = executor
    requests = guest.requests()
    for request in requests:
        run.run([request])  # one at a time: the writes land before the reads
    assert [r.status for r in requests] == EXPECTED
    assert bytes(requests[2].data[0]) == bytes(requests[0].data[0])
    assert bytes(requests[4].data[0]) == bytes(requests[1].data[0])
    assert bytes(requests[8].data[0]) == bytes(8 * SECTOR)  # zeroed, then discarded


def test_a_whole_batch_keeps_each_status(executor: tuple[Executor, Guest]) -> None:
    run, guest = executor
    reads = [guest.request(RequestType.IN, i * SECTOR, SECTOR) for i in range(8)]
    reads.insert(3, guest.request(RequestType.IN, SHRUNK + 8 * SECTOR, SECTOR))
    run.run(reads)
    assert [r.status for r in reads] == [Status.OK] * 3 + [Status.IOERR] + [Status.OK] * 5
    assert all(bytes(r.data[0]) == b"\xaa" * SECTOR for i, r in enumerate(reads) if i != 3)
