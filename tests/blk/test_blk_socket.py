"""BlkDevice served on a real vhost-user socket, driven by vdev's Python front-end
(the pytest plugin's vdev_frontend)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from blk_helpers import SECTOR, header, le32, segments
from vdev_backends.blk_file import FileBackend
from vdev_backends.blk_ram import RamBackend

from vdev.config import DeviceSpec, build_device
from vdev.devices.blk import CONFIG, BlkDevice, BlkFeature, RequestType, Status
from vdev.protocol import DeviceConfig, Request
from vdev.testing.driver_rings import UsedBuffer
from vdev.testing.frontend import FrontendQueue
from vdev.testing.pytest_plugin import FrontendFactory
from vdev.virtio.features import VirtioFeature

MiB = 1 << 20
SIZE = 8 * MiB


def status(used: UsedBuffer) -> int:
    return used.last_byte


async def transact(queue: FrontendQueue, readable: list[bytes], writable: list[int]) -> UsedBuffer:
    with trio.fail_after(10):
        return await queue.transact(readable, writable)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


async def test_file_disk_over_vhost_user(
    image: Path, vdev_frontend: FrontendFactory, vdev_ring_layout: str
) -> None:
    packed = vdev_ring_layout == "packed"
    device = BlkDevice(FileBackend(image), serial="sock-disk")
    fe = await vdev_frontend(device, packed=packed)
    assert fe.features & BlkFeature.FLUSH and fe.features & BlkFeature.DISCARD
    assert bool(fe.features & VirtioFeature.RING_PACKED) == packed
    config = await fe.get_config(0, CONFIG.size)
    assert int.from_bytes(config[:8], "little") == SIZE // SECTOR
    assert le32(config, 20) == 512  # blk_size
    q = await fe.setup_queue(0, size=128)

    data = os.urandom(64 * 1024)
    write = await transact(q, [header(RequestType.OUT, 2048), data], [1])
    flush = await transact(q, [header(RequestType.FLUSH)], [1])
    read = await transact(q, [header(RequestType.IN, 2048)], [32 * 1024] * 2 + [1])
    get_id = await transact(q, [header(RequestType.GET_ID)], [20, 1])
    zeroes = await transact(q, [header(RequestType.WRITE_ZEROES), segments((2048, 16, 1))], [1])
    discard = await transact(q, [header(RequestType.DISCARD), segments((2064, 16, 0))], [1])
    past_end = await transact(q, [header(RequestType.IN, SIZE // SECTOR)], [SECTOR, 1])
    unknown = await transact(q, [header(77)], [1])
    reread = await transact(q, [header(RequestType.IN, 2048)], [16 * SECTOR, 1])

    assert [status(u) for u in (write, flush, read, get_id, zeroes, discard)] == [0] * 6
    assert b"".join(read.data)[:-1] == data
    assert read.written == len(data) + 1
    assert get_id.data[0] == b"sock-disk" + bytes(11)
    assert (status(past_end), status(unknown)) == (Status.IOERR, Status.UNSUPP)
    assert reread.data[0] == bytes(16 * SECTOR)
    stats = device.stats()
    assert stats["requests"] == 9 and stats["errors"] == 2
    assert stats["bytes_written"] == len(data)


async def test_two_queues_both_carry_requests(
    tmp_path: Path, vdev_frontend: FrontendFactory
) -> None:
    device = build_device(
        DeviceSpec("blk", tmp_path / "mq.sock", "ram", {"size": "8M", "queues": "2"})
    )
    assert isinstance(device, BlkDevice) and device.num_queues == 2
    fe = await vdev_frontend(device)
    assert fe.features & BlkFeature.MQ
    assert int.from_bytes((await fe.get_config(34, 2)), "little") == 2
    q0, q1 = await fe.setup_queue(0), await fe.setup_queue(1)
    for i in range(8):
        q0.add([header(RequestType.OUT, i), bytes([i]) * SECTOR], [1])
        q1.add([header(RequestType.OUT, 100 + i), bytes([100 + i]) * SECTOR], [1])
    q0.kick()
    q1.kick()
    with trio.fail_after(10):
        used0 = await q0.wait_used(8)
        used1 = await q1.wait_used(8)
    assert all(status(u) == 0 for u in used0 + used1)
    back = await transact(q1, [header(RequestType.IN, 0)], [8 * SECTOR, 1])
    assert back.data[0] == b"".join(bytes([i]) * SECTOR for i in range(8))
    stats = device.stats()
    assert stats["queue0_requests"] == 8 and stats["queue1_requests"] == 9


async def test_guest_sets_the_cache_mode(vdev_frontend: FrontendFactory) -> None:
    device = BlkDevice(RamBackend(SIZE))
    fe = await vdev_frontend(device)
    assert (await fe.get_config(32, 1)) == b"\x01"
    await fe.send(Request.SET_CONFIG, DeviceConfig(32, 1, 0, b"\x00"), need_reply=True)
    assert (await fe.get_config(32, 1)) == b"\x00"
    assert device.writethrough


async def test_read_only_disk_refuses_writes(image: Path, vdev_frontend: FrontendFactory) -> None:
    image.write_bytes(b"\x5a" * SIZE)
    fe = await vdev_frontend(FileBackend(image, readonly=True))
    assert fe.features & BlkFeature.RO and not fe.features & BlkFeature.DISCARD
    q = await fe.setup_queue(0)
    write = await transact(q, [header(RequestType.OUT, 0), bytes(SECTOR)], [1])
    read = await transact(q, [header(RequestType.IN, 0)], [SECTOR, 1])
    assert (status(write), status(read)) == (Status.IOERR, Status.OK)
    assert read.data[0] == b"\x5a" * SECTOR
    assert image.read_bytes()[:SECTOR] == b"\x5a" * SECTOR
