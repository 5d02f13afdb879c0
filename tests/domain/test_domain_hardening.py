"""Hardening of the driver domain (issue 11): hostile memory tables, a domain that
gives up and comes back, a hung child, guest memory unmapped at reset, no sockets
for a block child."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import signal
from pathlib import Path

import pytest
import trio
from domain_helpers import (
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
from vdev.domain import host as host_module
from vdev.domain.host import DomainHost, DomainMemoryError
from vdev.testing.fakemem import FakeGuestMemory
from vdev.testing.frontend import Frontend, serve_device
from vdev.virtio.memory import GuestMemory

GUEST_MEMFD = "memfd:vdev-fake-guest"


def mappings(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


async def write_and_read(fe: Frontend, sector: int = 0) -> tuple[int, int, bytes]:
    """A session's I/O: (write status, read status, data read back == data written)."""
    await fe.negotiate()
    q = await fe.setup_queue(0)
    data = os.urandom(8 * SECTOR)
    write = await transact(q, [header(RequestType.OUT, sector), data], [1])
    read = await transact(q, [header(RequestType.IN, sector)], [len(data), 1])
    return status(write), status(read), read.data[0] == data


def file_memory(regions: int, region_size: int = mmap.PAGESIZE) -> tuple[GuestMemory, int]:
    """Guest memory of `regions` regions of one memfd, and that memfd."""
    fd = os.memfd_create("vdev-test-regions", os.MFD_CLOEXEC)
    os.ftruncate(fd, regions * region_size)
    memory = GuestMemory()
    for i in range(regions):
        gpa = i * region_size
        memory.add_region(gpa, region_size, 0x7F00_0000_0000 + gpa, gpa, fd)
    return memory, fd


def reset(host: DomainHost) -> None:
    """What a session does at reset: unmap the departed front-end's memory."""
    host.memory_changed(GuestMemory())


# --- item 3: a memory table cannot disable the domain -------------------------------------


async def test_guest_memory_above_2_63_does_not_collide(tmp_path: Path, image: Path) -> None:
    """Guest and user addresses at 2^63 (where the child maps the channel) are served,
    and the next session too."""
    device = blk_in_domain(tmp_path / "h.sock", "file", {"path": str(image)})
    host = host_of(device)
    high = FakeGuestMemory(8 << 20, base=1 << 63, regions=2, memfd=True, user_offset=1 << 62)
    async with serve_device(device, tmp_path / "h.sock") as path:
        async with Frontend.connect(path, memory=high) as fe:
            assert await write_and_read(fe) == (Status.OK, Status.OK, True)
        async with Frontend.connect(path) as fe:
            assert await write_and_read(fe, 64) == (Status.OK, Status.OK, True)
    assert (host.crashes, host.restarts, host.failure) == (0, 0, None)
    device.close()


async def test_table_the_child_cannot_map_fails_that_table_only(
    tmp_path: Path, image: Path
) -> None:
    device = blk_in_domain(tmp_path / "t.sock", "file", {"path": str(image)})
    host = host_of(device)
    pid = host.pid
    bad, fd = file_memory(4)
    os.ftruncate(fd, mmap.PAGESIZE)  # shrunk under the core: the child must refuse it
    with pytest.raises(DomainMemoryError, match="cannot map the guest memory table"):
        host.memory_changed(bad)
    bad.close()
    os.close(fd)
    async with serve_device(device, tmp_path / "t.sock") as path, Frontend.connect(path) as fe:
        assert await write_and_read(fe) == (Status.OK, Status.OK, True)
    assert (host.pid, host.crashes, host.failure) == (pid, 0, None)
    device.close()


async def test_more_regions_than_one_message_carries(tmp_path: Path, image: Path) -> None:
    """300 regions (SCM_RIGHTS carries 253 fds a message) are all mapped, by this child
    and by the next."""
    device = blk_in_domain(tmp_path / "r.sock", "file", {"path": str(image)})
    host = host_of(device)
    memory, fd = file_memory(300)
    os.close(fd)
    host.memory_changed(memory)
    assert host.pid is not None
    assert mappings(host.pid).count("memfd:vdev-test-regions") == 300
    kill_child(host)
    await wait_until(lambda: host.restarts == 1 and host.pid)
    assert mappings(host.pid).count("memfd:vdev-test-regions") == 300
    memory.close()
    device.close()


# --- item 4: giving up is not for good ----------------------------------------------------


async def test_new_session_after_repeated_crashes(
    tmp_path: Path, image: Path, plugins: None
) -> None:
    flag = tmp_path / "crash"
    options = {"path": str(image), "crash_flag": str(flag)}
    device = blk_in_domain(tmp_path / "c.sock", "crashy", options)
    host = host_of(device)
    async with serve_device(device, tmp_path / "c.sock") as path:
        async with Frontend.connect(path) as fe:
            assert await write_and_read(fe) == (Status.OK, Status.OK, True)
            flag.touch()
            kill_child(host)
            await wait_until(lambda: host.failure is not None)
        reset(host)
        assert host.stats()["domain_given_up"] == 1
        flag.unlink()
        async with Frontend.connect(path) as fe:
            assert await write_and_read(fe, 64) == (Status.OK, Status.OK, True)
    assert host.status == "serving" and host.failure is None
    assert host.stats()["domain_failed"] == 0
    device.close()


async def test_given_up_domain_keeps_trying(
    tmp_path: Path,
    image: Path,
    plugins: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a new session, the supervisor retries (backing off to the ceiling) and
    serves again once the child can start; giving up is logged once."""
    monkeypatch.setattr(host_module, "BACKOFF_MAX", 0.2)
    caplog.set_level(logging.DEBUG, host_module.__name__)
    flag = tmp_path / "crash"
    options = {"path": str(image), "crash_flag": str(flag)}
    device = blk_in_domain(tmp_path / "k.sock", "crashy", options)
    host = host_of(device)
    flag.touch()
    kill_child(host)
    await wait_until(lambda: host.failure is not None)

    def retries() -> int:
        return sum("failed to start" in r.getMessage() for r in caplog.records)

    await wait_until(lambda: retries() > host.max_failures + 2)
    assert host.stats()["domain_given_up"] == 1 and host.restarts == 0
    flag.unlink()
    await wait_until(lambda: host.status == "serving")
    assert host.stats()["domain_failed"] == 0 and host.restarts == 1
    assert sum("gave up" in r.getMessage() for r in caplog.records) == 1
    async with serve_device(device, tmp_path / "k.sock") as path, Frontend.connect(path) as fe:
        assert await write_and_read(fe) == (Status.OK, Status.OK, True)
    device.close()


async def test_new_session_after_requests_failed_while_given_up(
    tmp_path: Path, image: Path, plugins: None
) -> None:
    """Requests that failed while the domain was given up leave nothing on the rings
    for the next child to trip over."""
    flag = tmp_path / "crash"
    options = {"path": str(image), "crash_flag": str(flag)}
    device = blk_in_domain(tmp_path / "g.sock", "crashy", options)
    host = host_of(device)
    async with serve_device(device, tmp_path / "g.sock") as path:
        async with Frontend.connect(path) as fe:
            await fe.negotiate()
            q = await fe.setup_queue(0)
            flag.touch()
            kill_child(host)
            failed = await transact(q, [header(RequestType.IN, 0)], [SECTOR, 1])
        reset(host)
        flag.unlink()
        async with Frontend.connect(path) as fe:
            assert await write_and_read(fe) == (Status.OK, Status.OK, True)
    assert status(failed) == Status.IOERR
    assert host.crashes == 1
    device.close()


# --- item 5: a hung child is replaced -----------------------------------------------------


async def test_stopped_child_is_detected_and_replaced(tmp_path: Path, image: Path) -> None:
    device = blk_in_domain(tmp_path / "w.sock", "file", {"path": str(image)}, watchdog=1.0)
    host = host_of(device)
    data = [os.urandom(4 * SECTOR) for _ in range(8)]
    async with serve_device(device, tmp_path / "w.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        q = await fe.setup_queue(0)
        stopped = host.pid
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        for i, d in enumerate(data):
            q.add([header(RequestType.OUT, 8 * i), d], [1])
        q.kick()
        writes = await q.wait_used(len(data), timeout=20)
        reads = [
            await transact(q, [header(RequestType.IN, 8 * i)], [4 * SECTOR, 1])
            for i in range(len(data))
        ]
    assert [status(u) for u in writes + reads] == [Status.OK] * 2 * len(data)
    assert [r.data[0] for r in reads] == data
    assert (host.hangs, host.restarts) == (1, 1) and host.pid != stopped
    # The worker may take the first write before the rest are queued: what was in
    # flight when the child stopped is re-issued, the rest waited in the ring.
    assert 1 <= host.reissued <= len(data)
    assert not Path(f"/proc/{stopped}").exists()
    device.close()


def test_watchdog_must_be_seconds() -> None:
    from vdev.domain.spec import DomainSpec

    for bad in (-1, True, "5"):
        with pytest.raises(ValueError, match="watchdog"):
            DomainSpec("driver", watchdog=bad)  # type: ignore[arg-type]


# --- item 7: a departed front-end's memory is unmapped ------------------------------------


async def test_no_guest_mapping_after_reset(tmp_path: Path, image: Path) -> None:
    device = blk_in_domain(tmp_path / "u.sock", "file", {"path": str(image)})
    host = host_of(device)
    async with serve_device(device, tmp_path / "u.sock") as path, Frontend.connect(path) as fe:
        assert await write_and_read(fe) == (Status.OK, Status.OK, True)
        assert host.pid is not None
        assert GUEST_MEMFD in mappings(host.pid)
    reset(host)
    assert GUEST_MEMFD not in mappings(host.pid)
    assert not any(
        os.readlink(f"/proc/{host.pid}/fd/{fd}").startswith("/memfd:vdev-fake-guest")
        for fd in os.listdir(f"/proc/{host.pid}/fd")
    )
    kill_child(host)
    await wait_until(lambda: host.restarts == 1 and host.pid)
    assert GUEST_MEMFD not in mappings(host.pid)
    device.close()


async def test_no_guest_mapping_after_disconnect(tmp_path: Path, image: Path) -> None:
    device = blk_in_domain(tmp_path / "d.sock", "file", {"path": str(image)})
    host = host_of(device)
    async with serve_device(device, tmp_path / "d.sock") as path:
        async with Frontend.connect(path) as fe:
            assert await write_and_read(fe) == (Status.OK, Status.OK, True)
        await trio.sleep(0.5)  # the session ends
        assert host.pid is not None
        assert GUEST_MEMFD not in mappings(host.pid)
    device.close()


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
