"""Supervision: a killed child is replaced and its requests redone; a child that keeps
crashing is given up and requests fail instead of hanging."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio
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

from vdev.config import ConfigError
from vdev.devices.blk import RequestType, Status
from vdev.domain import host as host_module
from vdev.testing.frontend import Frontend, serve_device

BLOCK = 4096
KILLS = 3


@pytest.mark.parametrize("memory", ["map", "copy"])
async def test_kill_during_writes_loses_nothing(tmp_path: Path, image: Path, memory: str) -> None:
    """kill -9 the child three times under a write/verify workload at queue depth 16:
    no request fails, every block reads back as last written, restarts are counted."""
    device = blk_in_domain(tmp_path / "k.sock", "file", {"path": str(image)}, memory=memory)
    host = host_of(device)
    latest: dict[int, bytes] = {}
    statuses: list[int] = []
    rng = random.Random(7)
    async with (
        serve_device(device, tmp_path / "k.sock") as path,
        Frontend.connect(path, mem_size=16 << 20) as fe,
    ):
        await fe.negotiate()
        q = await fe.setup_queue(0, size=128)

        async def workload(stop: trio.Event) -> None:
            while not stop.is_set():
                for block in rng.sample(range(IMAGE_SIZE // BLOCK), 16):
                    latest[block] = data = os.urandom(BLOCK)
                    q.add([header(RequestType.OUT, block * BLOCK // SECTOR), data], [1])
                q.kick()
                statuses.extend(status(u) for u in await q.wait_used(16, timeout=30))

        stop = trio.Event()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(workload, stop)
                for kill in range(KILLS + 1):
                    await wait_until(lambda k=kill: host.restarts == k and host.pid)
                    done = len(statuses)
                    await wait_until(lambda n=done: len(statuses) > n + 100)
                    if kill < KILLS:
                        kill_child(host)
                stop.set()
        for block, data in latest.items():
            read = await transact(q, [header(RequestType.IN, block * BLOCK // SECTOR)], [BLOCK, 1])
            assert status(read) == Status.OK and read.data[0] == data, f"block {block}"
    assert statuses and set(statuses) == {Status.OK}
    assert (host.restarts, host.crashes, host.failure) == (KILLS, KILLS, None)
    assert host.reissued > 0  # some requests were in flight at a kill, and redone
    device.close()
    on_disk = image.read_bytes()
    assert all(on_disk[b * BLOCK : (b + 1) * BLOCK] == d for b, d in latest.items())


async def test_child_crashing_at_every_start_is_given_up(
    tmp_path: Path, image: Path, plugins: None
) -> None:
    flag = tmp_path / "crash"
    options = {"path": str(image), "crash_flag": str(flag)}
    device = blk_in_domain(tmp_path / "c.sock", "crashy", options)
    host = host_of(device)
    async with serve_device(device, tmp_path / "c.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        q = await fe.setup_queue(0)
        ok = await transact(q, [header(RequestType.OUT, 0), b"\x01" * SECTOR], [1])
        flag.touch()
        kill_child(host)
        # Requests issued while the child is being replaced wait for it, then fail.
        q.add([header(RequestType.IN, 0)], [SECTOR, 1])
        q.add([header(RequestType.FLUSH)], [1])
        q.kick()
        with trio.fail_after(30):
            waiting = await q.wait_used(2, timeout=30)
        late = await transact(q, [header(RequestType.OUT, 8), b"\x02" * SECTOR], [1])
        get_id = await transact(q, [header(RequestType.GET_ID)], [20, 1])
    assert status(ok) == Status.OK
    assert [status(u) for u in waiting] == [Status.IOERR, Status.IOERR]
    assert status(late) == Status.IOERR
    assert status(get_id) == Status.OK  # answered by the device model itself
    assert host.failure is not None
    assert f"gave up after {host_module.MAX_FAILURES} crashes in a row" in host.failure
    assert "SIGABRT" in host.failure
    assert host.crashes == 1 and host.restarts == 0
    assert device.stats()["errors"] == 3
    device.close()


async def test_child_crashing_at_first_start_fails_the_build(
    tmp_path: Path, image: Path, plugins: None
) -> None:
    flag = tmp_path / "crash"
    flag.touch()
    with pytest.raises(ConfigError, match=r"crashy backend: .*gave up after 5 crashes.*SIGABRT"):
        blk_in_domain(tmp_path / "f.sock", "crashy", {"path": str(image), "crash_flag": str(flag)})


def test_a_pidfd_above_1023_is_watched() -> None:
    """The watchdog's exit check takes any fd (select() raises above 1023)."""
    import resource
    import subprocess

    from vdev.domain.host import _readable

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), max(hard, 2048)))
    child = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(child.pid)
    high = os.dup2(pidfd, 1500)
    os.close(pidfd)
    try:
        assert not _readable(high)
        child.kill()
        child.wait()
        assert _readable(high)
    finally:
        os.close(high)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
