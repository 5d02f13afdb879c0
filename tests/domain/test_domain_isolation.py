"""What the child can reach: guest memory (or not), its user, its system calls."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from domain_helpers import (
    SECTOR,
    blk_in_domain,
    header,
    host_of,
    proc_status,
    status,
    transact,
)

from vdev.devices.blk import RequestType, Status
from vdev.testing.frontend import Frontend, serve_device

#: The name FakeGuestMemory gives the memfd holding the front-end's guest memory.
GUEST_MEMFD = "memfd:vdev-fake-guest"
CHANNEL_MEMFD = "memfd:vdev-domain-channel"


def mappings(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("memory", ["map", "copy"])
async def test_only_map_lets_the_child_see_guest_memory(
    tmp_path: Path, image: Path, memory: str
) -> None:
    device = blk_in_domain(tmp_path / "m.sock", "file", {"path": str(image)}, memory=memory)
    host = host_of(device)
    data = os.urandom(16 * SECTOR)
    async with serve_device(device, tmp_path / "m.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        q = await fe.setup_queue(0)
        write = await transact(q, [header(RequestType.OUT, 0), data], [1])
        read = await transact(q, [header(RequestType.IN, 0)], [len(data), 1])
        assert host.pid is not None
        maps = mappings(host.pid)
        # The core itself maps the guest's memory, as any vhost-user back-end must.
        assert GUEST_MEMFD in mappings(os.getpid())
    assert status(write) == status(read) == Status.OK and read.data[0] == data
    assert CHANNEL_MEMFD in maps
    assert (GUEST_MEMFD in maps) == (memory == "map")
    device.close()


def can_open_as(path: Path, uid: int, gid: int) -> bool:
    """Whether user `uid` may open `path` (tried in a forked process)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the forked child
        code = 2
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.close(os.open(path, os.O_RDWR))
            code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    assert code in (0, 1), "the probe failed"
    return code == 0


async def test_domain_user_nobody(tmp_path: Path) -> None:
    """The child runs as nobody, with the image open although nobody cannot open it."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    image = private / "disk.img"
    image.write_bytes(bytes(1 << 20))
    image.chmod(0o600)
    nobody = pwd.getpwnam("nobody")
    assert not can_open_as(image, nobody.pw_uid, nobody.pw_gid)
    device = blk_in_domain(tmp_path / "n.sock", "file", {"path": str(image)}, user="nobody")
    host = host_of(device)
    data = os.urandom(8 * SECTOR)
    async with serve_device(device, tmp_path / "n.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        q = await fe.setup_queue(0)
        write = await transact(q, [header(RequestType.OUT, 8), data], [1])
        read = await transact(q, [header(RequestType.IN, 8)], [len(data), 1])
        assert host.pid is not None
        child = proc_status(host.pid)
        open_files = [
            os.readlink(f"/proc/{host.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{host.pid}/fd")
        ]
    assert status(write) == status(read) == Status.OK and read.data[0] == data
    assert child["Uid"].split() == [str(nobody.pw_uid)] * 4
    assert child["Gid"].split() == [str(nobody.pw_gid)] * 4
    assert child["Groups"] == ""
    assert child["CapEff"] == child["CapPrm"] == "0000000000000000"
    assert child["NoNewPrivs"] == "1"
    assert str(image) in open_files  # handed over before the drop, not reopened
    device.close()
    assert image.read_bytes()[8 * SECTOR : 16 * SECTOR] == data


@pytest.mark.parametrize("seccomp", [True, False])
async def test_seccomp_filter_refuses_new_programs(
    tmp_path: Path, image: Path, plugins: None, seccomp: bool
) -> None:
    """A backend whose flush runs a program: refused (IOERR) under the filter."""
    device = blk_in_domain(tmp_path / "s.sock", "spawning", {"path": str(image)}, seccomp=seccomp)
    host = host_of(device)
    async with serve_device(device, tmp_path / "s.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        q = await fe.setup_queue(0)
        write = await transact(q, [header(RequestType.OUT, 0), bytes(SECTOR)], [1])
        flush = await transact(q, [header(RequestType.FLUSH)], [1])
        assert host.pid is not None
        filtered = proc_status(host.pid)["Seccomp"]
    assert status(write) == Status.OK
    assert status(flush) == (Status.IOERR if seccomp else Status.OK)
    assert filtered == ("2" if seccomp else "0")
    assert host.crashes == 0
    device.close()
