"""Hardening of the driver domain (issue 11): no sockets for a block child."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from domain_helpers import SECTOR, blk_in_domain, header, status, transact

from vdev.devices.blk import RequestType, Status
from vdev.testing.frontend import Frontend, serve_device

# --- seccomp: no sockets for a block child ------------------------------------------------


@pytest.mark.parametrize("seccomp", [True, False])
async def test_block_child_cannot_create_sockets(
    tmp_path: Path, image: Path, plugins: None, seccomp: bool
) -> None:
    device = blk_in_domain(tmp_path / "s.sock", "socket", {"path": str(image)}, seccomp=seccomp)
    async with serve_device(device, tmp_path / "s.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        q = await fe.setup_queue(0)
        flush = await transact(q, [header(RequestType.FLUSH)], [1])
    assert status(flush) == Status.OK
    device.close()
    outcome = image.read_bytes()[:SECTOR].rstrip().decode()
    refused = f"errno {errno.EPERM}"
    assert outcome == (f"{refused}, {refused}" if seccomp else "created, created")
