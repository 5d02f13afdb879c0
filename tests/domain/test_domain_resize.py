"""Live resize of a disk whose backend is in a driver domain: the child resizes it, and
a child that replaces it starts at the new size."""

from __future__ import annotations

from pathlib import Path

import pytest
from domain_helpers import (
    IMAGE_SIZE,
    SECTOR,
    blk_in_domain,
    header,
    host_of,
    kill_child,
    status,
    transact,
    wait_until,
)

from vdev.devices.blk import RequestType, Status
from vdev.testing.frontend import Frontend, running_server

BIG = 2 * IMAGE_SIZE


@pytest.mark.parametrize("backend", ["file", "ram"])
async def test_resize_reaches_the_child_and_outlives_it(
    tmp_path: Path, image: Path, backend: str
) -> None:
    options = {"path": str(image)} if backend == "file" else {"size": IMAGE_SIZE}
    device = blk_in_domain(tmp_path / "d.sock", backend, options)
    host = host_of(device)
    last = BIG // SECTOR - 1
    data = bytes(range(256)) * 2
    try:
        async with (
            running_server(device, tmp_path / "d.sock") as server,
            Frontend.connect(server.path) as fe,
        ):
            await fe.negotiate()
            q = await fe.setup_queue(0)
            assert status(await transact(q, [header(RequestType.IN, last)], [SECTOR, 1])) == (
                Status.IOERR
            )
            assert await server.resize(BIG)
            assert device.backend.size == BIG
            if backend == "file":
                assert image.stat().st_size == BIG
            write = await transact(q, [header(RequestType.OUT, last), data], [1])
            assert status(write) == Status.OK

            old = kill_child(host)
            await wait_until(lambda: host.pid not in (None, old))
            read = await transact(q, [header(RequestType.IN, last)], [SECTOR, 1])
            assert status(read) == Status.OK  # the new child has the new size
            if backend == "file":
                assert read.data[0] == data
    finally:
        device.close()


async def test_backend_that_cannot_resize_says_so(tmp_path: Path) -> None:
    device = blk_in_domain(tmp_path / "n.sock", "null", {"size": IMAGE_SIZE})
    try:
        with pytest.raises(ValueError, match="the BlockProxy backend cannot be resized"):
            device.resize(BIG)
    finally:
        device.close()
