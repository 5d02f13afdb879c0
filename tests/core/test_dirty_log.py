"""Dirty logging for live migration, over a real socket: the front-end shares a log
(SET_LOG_BASE), acks VHOST_F_LOG_ALL, and finds exactly the pages the device wrote
marked: the data of IN requests, the status bytes, and the ring's own stores."""

from __future__ import annotations

import pytest
from vdev_backends.blk_ram import RamBackend

from vdev.devices.blk import REQUEST_HEADER, BlkDevice, RequestType
from vdev.protocol import ProtocolFeature, Request, VringAddress
from vdev.protocol.constants import VHOST_F_LOG_ALL
from vdev.testing.frontend import (
    Frontend,
    FrontendError,
    FrontendQueue,
    running_server,
    serve_device,
)
from vdev.virtio.dirtylog import LOG_PAGE, dirty_pages

MiB = 1 << 20
#: A log covering the front-end's guest memory (8 MiB from 1 MiB on) as QEMU sizes it.
LOG_SIZE = 16 * MiB // LOG_PAGE // 8


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // LOG_PAGE, (gpa + length - 1) // LOG_PAGE + 1))


async def transact(queue: FrontendQueue, readable: list[bytes], writable: list[int]) -> set[int]:
    """One virtio-blk request, which must succeed; the pages of its writable buffers."""
    token = queue.add(readable, writable)
    written = set().union(*(pages(g, n) for g, n, w in queue.ring.buffers(token) if w))
    queue.kick()
    [used] = await queue.wait_used(1)
    assert used.last_byte == 0  # VIRTIO_BLK_S_OK
    return written


async def read(queue: FrontendQueue, sector: int, length: int) -> set[int]:
    """An IN request: the device writes the data and the status byte."""
    return await transact(queue, [REQUEST_HEADER.pack(RequestType.IN, 0, sector)], [length, 1])


async def write(queue: FrontendQueue, sector: int, data: bytes) -> set[int]:
    """An OUT request: the device writes the status byte only."""
    return await transact(queue, [REQUEST_HEADER.pack(RequestType.OUT, 0, sector), data], [1])


def ring_pages(queue: FrontendQueue, packed: bool) -> set[int]:
    """The pages of the ring areas the device stores into."""
    if packed:
        return pages(queue.ring.desc_gpa, 16 * queue.ring.size) | pages(queue.ring.used_gpa, 4)
    return pages(queue.ring.used_gpa, 6 + 8 * queue.ring.size)


async def migrating_frontend(fe: Frontend, packed: bool) -> tuple[FrontendQueue, int]:
    """Negotiate without logging, set a queue up; return it and the features."""
    assert (await fe.send(Request.GET_FEATURES)).payload & VHOST_F_LOG_ALL
    features = await fe.negotiate(packed=packed)
    assert not features & VHOST_F_LOG_ALL
    assert fe.protocol_features & ProtocolFeature.LOG_SHMFD
    return await fe.setup_queue(0), features


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_the_log_marks_exactly_the_pages_the_device_wrote(tmp_path, packed):
    path = tmp_path / "blk.sock"
    device = BlkDevice(RamBackend(4 * MiB))
    async with serve_device(device, path), Frontend.connect(path) as fe:
        queue, features = await migrating_frontend(fe, packed)
        await write(queue, 0, bytes(range(256)) * 64)  # before migration: not logged
        log = await fe.set_log_base(LOG_SIZE)
        assert dirty_pages(log) == []
        # What QEMU does as migration starts: the feature, then the rings' log flag.
        await fe.send(Request.SET_FEATURES, features | VHOST_F_LOG_ALL, need_reply=True)
        await fe.log_rings()
        expected = await read(queue, 0, 3 * LOG_PAGE + 512)  # crosses pages
        expected |= await read(queue, 9, 512)
        expected |= await write(queue, 16, b"w" * 4096)
        marked = set(dirty_pages(log))
        ring = ring_pages(queue, packed)
        assert marked - ring == expected - ring
        assert marked & ring, "the used ring's stores were not logged"
        # The readable buffers (headers, OUT data) were never marked.
        log[:] = bytes(LOG_SIZE)
        await fe.send(Request.SET_FEATURES, features, need_reply=True)  # migration over
        await read(queue, 0, 4096)
        assert dirty_pages(log) == []
        log.close()
    device.close()


async def test_nothing_is_logged_without_log_all(tmp_path):
    path = tmp_path / "blk.sock"
    device = BlkDevice(RamBackend(4 * MiB))
    async with serve_device(device, path), Frontend.connect(path) as fe:
        queue, _ = await migrating_frontend(fe, packed=False)
        log = await fe.set_log_base(LOG_SIZE)
        await fe.log_rings()
        await read(queue, 0, 8192)
        await write(queue, 0, b"x" * 512)
        assert dirty_pages(log) == []
        log.close()
    device.close()


async def test_a_log_too_small_for_guest_memory_is_refused_and_the_session_goes_on(tmp_path):
    path = tmp_path / "blk.sock"
    device = BlkDevice(RamBackend(4 * MiB))
    async with serve_device(device, path), Frontend.connect(path) as fe:
        queue, _ = await migrating_frontend(fe, packed=False)
        with pytest.raises(FrontendError, match="refused the dirty log"):
            await fe.set_log_base(LOG_SIZE // 4)
        assert await read(queue, 0, 512)
    device.close()


async def test_a_ring_beyond_the_log_fails_alone_when_logging_starts(tmp_path):
    path = tmp_path / "blk.sock"
    device = BlkDevice(RamBackend(4 * MiB))
    async with running_server(device, path) as server, Frontend.connect(path) as fe:
        queue, features = await migrating_frontend(fe, packed=False)
        log = await fe.set_log_base(LOG_SIZE)
        ring = queue.ring
        bad = VringAddress(0, 1, ring.desc_addr, ring.used_addr, ring.avail_addr, 1 << 40)
        await fe.send(Request.SET_VRING_ADDR, bad, need_reply=True)
        ack = await fe.send(Request.SET_FEATURES, features | VHOST_F_LOG_ALL, need_reply=True)
        assert ack.payload == 0
        assert server.session is not None
        failure = server.session.vrings[0].failure
        assert failure is not None and "beyond the dirty log" in failure
        log.close()
    device.close()


async def test_a_new_log_replaces_the_old_one_while_logging(tmp_path):
    """QEMU hands over a bigger log when guest memory grows, logging on: once the
    device answers, it marks the new log only (the front-end frees the old one)."""
    path = tmp_path / "blk.sock"
    device = BlkDevice(RamBackend(4 * MiB))
    async with serve_device(device, path), Frontend.connect(path) as fe:
        queue, features = await migrating_frontend(fe, packed=False)
        old = await fe.set_log_base(LOG_SIZE)
        await fe.send(Request.SET_FEATURES, features | VHOST_F_LOG_ALL, need_reply=True)
        first = await read(queue, 0, 4096)
        assert set(dirty_pages(old)) >= first
        old[:] = bytes(LOG_SIZE)
        new = await fe.set_log_base(2 * LOG_SIZE)
        second = await read(queue, 8, 4096)
        assert dirty_pages(old) == []
        assert set(dirty_pages(new)) >= second
        old.close()
        new.close()
    device.close()
