"""Helpers for the tracer's tests: a disk used through whatever socket is given."""

from __future__ import annotations

import trio

from vdev.devices.blk import REQUEST_HEADER, RequestType
from vdev.testing.frontend import Frontend

SECTOR = 512


def blk_header(kind: int, sector: int) -> bytes:
    return REQUEST_HEADER.pack(kind, 0, sector)


async def use_disk(fe: Frontend) -> bytes:
    """Negotiate, write a sector, read it back; the data read."""
    await fe.negotiate()
    queue = await fe.setup_queue(0, size=64)
    data = bytes(range(256)) * 2
    with trio.fail_after(10):
        write = await queue.transact([blk_header(RequestType.OUT, 3), data], [1])
        read = await queue.transact([blk_header(RequestType.IN, 3)], [SECTOR, 1])
    assert write.last_byte == 0 and read.last_byte == 0
    return read.data[0][:SECTOR]
