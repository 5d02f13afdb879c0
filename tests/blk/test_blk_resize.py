"""Live disk resize: the backends, BlkDevice's capacity and bounds, and the front-end
told over the back-end channel (vdev.testing's front-end on a real socket)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from blk_helpers import SECTOR, ListQueue, header, read_req, write_req
from vdev_backends.blk_file import FileBackend
from vdev_backends.blk_null import NullBackend
from vdev_backends.blk_ram import RamBackend

from vdev.backend import BlockBackend
from vdev.devices.blk import CONFIG, BlkDevice, RequestType, Status
from vdev.protocol import BackendRequest
from vdev.testing.frontend import Frontend, running_server

MiB = 1 << 20


def views(*sizes: int) -> list[memoryview]:
    return [memoryview(bytearray(n)) for n in sizes]


def sparse_image(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


@pytest.fixture(params=["file", "ram"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockBackend]:
    if request.param == "file":
        b: BlockBackend = FileBackend(sparse_image(tmp_path / "disk.img", MiB))
    else:
        b = RamBackend(MiB)
    yield b
    b.close()


def test_backend_grows_and_shrinks_keeping_its_data(backend: BlockBackend) -> None:
    head, tail = os.urandom(4096), os.urandom(4096)
    backend.write(0, [memoryview(head)])
    backend.write(MiB - 4096, [memoryview(tail)])

    backend.resize(3 * MiB)
    assert backend.size == 3 * MiB
    grown = views(4096, 4096, 4096)
    backend.read(MiB - 4096, grown)
    assert [bytes(v) for v in grown] == [tail, bytes(4096), bytes(4096)]
    backend.write(3 * MiB - 512, [memoryview(b"z" * 512)])

    backend.resize(MiB // 2)
    assert backend.size == MiB // 2
    first = views(4096)
    backend.read(0, first)
    assert bytes(first[0]) == head
    for call, buffers in ((backend.read, views(512)), (backend.write, [memoryview(head)])):
        with pytest.raises(OSError) as info:
            call(MiB // 2 - 256, buffers)  # straddles the new end
        assert info.value.errno == errno.EIO
    backend.resize(3 * MiB)  # what lay past the shrunk end is gone
    again = views(512, 4096)
    backend.read(3 * MiB - 512 - 4096, again)
    assert bytes(again[0]) + bytes(again[1]) == bytes(512 + 4096)


def test_file_backend_resizes_its_file(tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "disk.img", MiB)
    backend = FileBackend(image)
    try:
        backend.resize(5 * MiB)
        assert image.stat().st_size == 5 * MiB
        backend.resize(MiB // 4)
        assert image.stat().st_size == MiB // 4
    finally:
        backend.close()


def test_ram_reader_on_the_old_mapping_is_safe() -> None:
    backend = RamBackend(MiB)
    backend.write(0, [memoryview(b"a" * 512)])
    old = backend._view  # what a worker thread in the middle of a read holds
    backend.resize(MiB // 2)
    assert bytes(old[:512]) == b"a" * 512  # still mapped, and the old contents
    del old
    backend.close()


def capacity(device: BlkDevice) -> int:
    return int.from_bytes(device.config()[:8], "little")


def run(device: BlkDevice, *reqs: object) -> ListQueue:
    queue = ListQueue()
    queue.add(*reqs)  # type: ignore[arg-type]
    device.start_queue(queue)
    device.handle(queue)
    return queue


def test_device_capacity_and_bounds_follow_the_size() -> None:
    device = BlkDevice(RamBackend(MiB))
    end = MiB // SECTOR
    assert capacity(device) == end
    beyond = read_req(end, 512)
    run(device, beyond)
    assert beyond.status == Status.IOERR

    device.resize(2 * MiB)
    assert capacity(device) == 2 * end
    write, read = write_req(2 * end - 1, b"q" * 512), read_req(2 * end - 1, 512)
    run(device, write, read)
    assert (write.status, read.status, read.data_in) == (Status.OK, Status.OK, b"q" * 512)

    device.resize(MiB)
    stale = read_req(2 * end - 1, 512)
    run(device, stale)
    assert stale.status == Status.IOERR
    device.close()


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "size: 0 is not a positive number of 512-byte blocks"),
        (-512, "size: -512 is not a positive"),
        (1000, "size: 1000 is not a positive"),
        ("1M", "size: '1M' is not a positive"),
        (True, "size: True is not a positive"),
    ],
)
def test_bad_sizes_are_refused_in_one_line(size: object, text: str) -> None:
    device = BlkDevice(RamBackend(MiB))
    with pytest.raises(ValueError, match=text) as info:
        device.resize(size)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert capacity(device) == MiB // SECTOR
    device.close()


def test_sizes_must_be_whole_logical_blocks() -> None:
    device = BlkDevice(RamBackend(MiB, block_size=4096))
    with pytest.raises(ValueError, match="not a positive number of 4096-byte blocks"):
        device.resize(MiB + 512)
    device.resize(MiB + 4096)
    assert capacity(device) == (MiB + 4096) // SECTOR
    device.close()


def test_disks_that_cannot_be_resized(tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "ro.img", MiB)
    for backend, text in (
        (FileBackend(image, readonly=True), "a read-only disk cannot be resized"),
        (NullBackend(MiB), "the NullBackend backend cannot be resized"),
    ):
        device = BlkDevice(backend)
        with pytest.raises(ValueError, match=text):
            device.resize(2 * MiB)
        assert capacity(device) == MiB // SECTOR
        device.close()
    assert image.stat().st_size == MiB


def test_a_failed_resize_keeps_the_old_size() -> None:
    device = BlkDevice(RamBackend(MiB))
    with pytest.raises(ValueError, match=r"resize to \d+ bytes failed: size: cannot map"):
        device.resize(1 << 60)
    assert capacity(device) == MiB // SECTOR
    assert device.backend.size == MiB
    device.close()


async def test_resize_over_vhost_user(tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "disk.img", MiB)
    device = BlkDevice(FileBackend(image))
    async with (
        running_server(device, tmp_path / "blk.sock") as server,
        Frontend.connect(server.path) as fe,
    ):
        await fe.negotiate()
        queue = await fe.setup_queue(0)
        last = 4 * MiB // SECTOR - 1

        async def read_last() -> int:
            with trio.fail_after(10):
                used = await queue.transact([header(RequestType.IN, last)], [SECTOR, 1])
            return used.last_byte

        assert await read_last() == Status.IOERR
        assert await server.resize(4 * MiB)
        [msg] = fe.backend_requests
        assert msg.request is BackendRequest.CONFIG_CHANGE_MSG and msg.need_reply
        config = await fe.get_config(0, CONFIG.size)
        assert int.from_bytes(config[:8], "little") == 4 * MiB // SECTOR
        assert image.stat().st_size == 4 * MiB
        assert await read_last() == Status.OK

        with pytest.raises(ValueError, match="not a positive number"):
            await server.resize(100)
        assert len(fe.backend_requests) == 1  # a refused resize tells nobody

        assert await server.resize(MiB)
        assert len(fe.backend_requests) == 2
        assert await read_last() == Status.IOERR
    device.close()
