"""End to end: a front-end truncates its guest memory after SET_MEM_TABLE, then kicks.

The daemon (here: this test process) must live, and the next front-end must be served.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

import trio
from vdev_backends.blk_ram import RamBackend

from vdev.devices.blk import BlkDevice, RequestType
from vdev.testing.frontend import Frontend, FrontendQueue, serve_device
from vdev.virtio.memory import GuestMemory

SECTOR = 512
DATA = bytes(range(256)) * 2


class _MemoryWatchingRam(RamBackend):
    """A RAM disk that keeps the session's guest memory, to look at its fault."""

    memory: GuestMemory | None = None

    def memory_changed(self, memory: GuestMemory) -> None:
        self.memory = memory


async def _request(
    queue: FrontendQueue, kind: RequestType, data: bytes = b"", writable: Sequence[int] = ()
) -> bytes:
    """One block request at sector 0; the bytes the device wrote (status last)."""
    readable = [struct.pack("<IIQ", kind, 0, 0)] + ([data] if data else [])
    with trio.fail_after(10):
        used = await queue.transact(readable, [*writable, 1])
    return b"".join(used.data)


async def _truncate_and_kick(fe: Frontend) -> FrontendQueue:
    """Set up a queue, complete a write, then shrink the memfd to nothing and kick."""
    await fe.negotiate()
    queue = await fe.setup_queue(0)
    assert await _request(queue, RequestType.OUT, DATA) == b"\0"
    fd = fe.memory.regions[0].fd
    assert fd is not None
    os.ftruncate(fd, 0)
    os.eventfd_write(queue.kick_fd, 1)  # raw: the driver side must not touch memory now
    return queue


async def _next_session_works(path: Path) -> None:
    async with Frontend.connect(path) as fe:
        await fe.negotiate()
        queue = await fe.setup_queue(0)
        assert await _request(queue, RequestType.IN, writable=[SECTOR]) == DATA + b"\0"


async def test_truncated_guest_memory_does_not_kill_the_daemon(tmp_path: Path) -> None:
    backend = _MemoryWatchingRam(1 << 20)
    device = BlkDevice(backend)
    async with serve_device(device, tmp_path / "blk.sock") as path:
        async with Frontend.connect(path) as fe:
            await _truncate_and_kick(fe)
            with trio.fail_after(10):
                while backend.memory is None or backend.memory.fault is None:
                    await trio.sleep(0.01)
        await _next_session_works(path)
    device.close()


async def test_truncated_guest_memory_ends_the_session(tmp_path: Path) -> None:
    """A fault fails the session: the server hangs up, and serves the next front-end."""
    device = BlkDevice(RamBackend(1 << 20))
    async with serve_device(device, tmp_path / "blk.sock") as path:
        async with Frontend.connect(path) as fe:
            await _truncate_and_kick(fe)
            with trio.fail_after(2):
                assert await fe.sock.recv(1) == b""
        await _next_session_works(path)
    device.close()
