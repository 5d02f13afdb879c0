"""virtio-blk with its backend in a driver domain, driven over vhost-user by vdev's
Python front-end: data, every status, both memory policies, error attribution."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from domain_helpers import (
    IMAGE_SIZE,
    SECTOR,
    blk_in_domain,
    header,
    host_of,
    segments,
    status,
    transact,
)

from vdev.config import ConfigError, DeviceSpec, build_device, load_config
from vdev.devices.blk import BlkFeature, RequestType, Status
from vdev.devices.blk_requests import BlkRequest
from vdev.domain.spec import DomainSpec
from vdev.testing.fakemem import FakeGuestMemory
from vdev.testing.frontend import Frontend, serve_device
from vdev.testing.pytest_plugin import DaemonFactory

POLICIES = ["map", "copy"]


@pytest.mark.parametrize("memory", POLICIES)
async def test_data_and_statuses(tmp_path: Path, image: Path, memory: str) -> None:
    device = blk_in_domain(
        tmp_path / "d.sock", "file", {"path": str(image), "serial": "dd-1"}, memory=memory
    )
    data = os.urandom(64 * 1024)
    async with serve_device(device, tmp_path / "d.sock") as path, Frontend.connect(path) as fe:
        features = await fe.negotiate()
        assert features & BlkFeature.DISCARD and features & BlkFeature.WRITE_ZEROES
        q = await fe.setup_queue(0, size=128)
        write = await transact(q, [header(RequestType.OUT, 2048), data], [1])
        flush = await transact(q, [header(RequestType.FLUSH)], [1])
        read = await transact(q, [header(RequestType.IN, 2048)], [32 * 1024] * 2 + [1])
        get_id = await transact(q, [header(RequestType.GET_ID)], [20, 1])
        zeroes = await transact(q, [header(RequestType.WRITE_ZEROES), segments((2048, 16, 1))], [1])
        discard = await transact(q, [header(RequestType.DISCARD), segments((2064, 16, 0))], [1])
        past_end = await transact(q, [header(RequestType.IN, IMAGE_SIZE // SECTOR)], [SECTOR, 1])
        unknown = await transact(q, [header(77)], [1])
        reread = await transact(q, [header(RequestType.IN, 2048)], [len(data), 1])
    assert [status(u) for u in (write, flush, read, get_id, zeroes, discard)] == [Status.OK] * 6
    assert b"".join(read.data)[:-1] == data
    assert get_id.data[0] == b"dd-1" + bytes(16)
    assert (status(past_end), status(unknown)) == (Status.IOERR, Status.UNSUPP)
    assert reread.data[0] == bytes(32 * SECTOR) + data[32 * SECTOR :]
    host = host_of(device)
    assert host.spec.memory == memory and host.failure is None
    device.close()
    start = 2048 * SECTOR
    assert image.read_bytes()[start : start + len(data)] == reread.data[0]


@pytest.mark.parametrize("memory", POLICIES)
async def test_backend_errors_keep_their_request(tmp_path: Path, image: Path, memory: str) -> None:
    """A batch in which the backend fails one request: that one is IOERR, the others OK."""
    device = blk_in_domain(tmp_path / "e.sock", "file", {"path": str(image)}, memory=memory)
    async with serve_device(device, tmp_path / "e.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        q = await fe.setup_queue(0, size=64)
        os.truncate(image, IMAGE_SIZE // 2)  # the image shrinks under the device
        good = os.urandom(4 * SECTOR)
        last = IMAGE_SIZE // SECTOR - 8
        q.add([header(RequestType.OUT, 0), good], [1])
        q.add([header(RequestType.IN, last)], [4 * SECTOR, 1])  # beyond the new end
        q.add([header(RequestType.IN, 0)], [4 * SECTOR, 1])
        q.kick()
        with trio.fail_after(20):
            used = sorted(await q.wait_used(3), key=lambda u: u.token)
    assert [status(u) for u in used] == [Status.OK, Status.IOERR, Status.OK]
    assert used[2].data[0] == good
    device.close()


async def test_read_only_and_several_queues(tmp_path: Path, image: Path) -> None:
    image.write_bytes(b"\x5a" * IMAGE_SIZE)
    spec = DeviceSpec(
        "blk",
        tmp_path / "ro.sock",
        "file",
        {"path": str(image), "readonly": "on", "queues": 2},
        domain=DomainSpec("driver"),
    )
    device = build_device(spec)
    async with serve_device(device, spec.socket) as path, Frontend.connect(path) as fe:
        features = await fe.negotiate()
        assert features & BlkFeature.RO and not features & BlkFeature.DISCARD
        q0, q1 = await fe.setup_queue(0), await fe.setup_queue(1)
        write = await transact(q0, [header(RequestType.OUT, 0), bytes(SECTOR)], [1])
        read0 = await transact(q0, [header(RequestType.IN, 0)], [SECTOR, 1])
        read1 = await transact(q1, [header(RequestType.IN, 8)], [SECTOR, 1])
    assert (status(write), status(read0), status(read1)) == (Status.IOERR, Status.OK, Status.OK)
    assert read0.data[0] == read1.data[0] == b"\x5a" * SECTOR
    device.close()
    assert image.read_bytes() == b"\x5a" * IMAGE_SIZE


async def test_large_requests_are_bounced_in_pieces(tmp_path: Path, image: Path) -> None:
    """With `copy`, a request larger than a quarter of the bounce area is cut up."""
    device = blk_in_domain(tmp_path / "l.sock", "file", {"path": str(image)}, memory="copy")
    data = os.urandom(3 << 20)
    async with (
        serve_device(device, tmp_path / "l.sock") as path,
        Frontend.connect(path, mem_size=16 << 20) as fe,
    ):
        await fe.negotiate()
        q = await fe.setup_queue(0)
        write = await transact(q, [header(RequestType.OUT, 0), data], [1])
        read = await transact(q, [header(RequestType.IN, 0)], [len(data), 1])
    assert status(write) == status(read) == Status.OK
    assert read.data[0] == data
    device.close()


async def test_backend_that_cannot_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"file backend: path: .*missing.img does not exist"):
        blk_in_domain(tmp_path / "m.sock", "file", {"path": str(tmp_path / "missing.img")})
    with pytest.raises(ConfigError, match="no user named"):
        blk_in_domain(tmp_path / "u.sock", "null", {"size": "1M"}, user="no-such-user-vdev")


async def test_memory_policy_map_sends_every_remap(tmp_path: Path, image: Path) -> None:
    """SET_MEM_TABLE again (a new layout): the child follows, and I/O still lands."""
    device = blk_in_domain(tmp_path / "r.sock", "file", {"path": str(image)})
    data = os.urandom(8 * SECTOR)
    async with serve_device(device, tmp_path / "r.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        q = await fe.setup_queue(0)
        assert status(await transact(q, [header(RequestType.OUT, 16), data], [1])) == Status.OK
        await fe.set_mem_table()
        read = await transact(q, [header(RequestType.IN, 16)], [len(data), 1])
    assert status(read) == Status.OK and read.data[0] == data
    device.close()


async def test_front_end_reconnects(tmp_path: Path, image: Path) -> None:
    """A second front-end session (new guest memory) works with the same child."""
    device = blk_in_domain(tmp_path / "re.sock", "file", {"path": str(image)})
    pid = host_of(device).pid
    data = os.urandom(4 * SECTOR)
    async with serve_device(device, tmp_path / "re.sock") as path:
        async with Frontend.connect(path) as fe:
            await fe.negotiate()
            q = await fe.setup_queue(0)
            assert status(await transact(q, [header(RequestType.OUT, 4), data], [1])) == Status.OK
        async with Frontend.connect(path, mem_size=4 << 20, regions=1) as fe:
            await fe.negotiate()
            q = await fe.setup_queue(0)
            read = await transact(q, [header(RequestType.IN, 4)], [len(data), 1])
    assert status(read) == Status.OK and read.data[0] == data
    assert host_of(device).pid == pid
    device.close()


def test_domain_options_from_a_config_file(tmp_path: Path, plugins: None) -> None:
    config = tmp_path / "vdev.toml"
    config.write_text(
        '[[device]]\ntype = "blk"\nsocket = "/tmp/x.sock"\nbackend = "null"\nsize = "1M"\n'
        'domain = { kind = "driver", memory = "copy", user = "nobody", seccomp = false }\n'
    )
    [spec] = load_config(config)
    assert spec.domain == DomainSpec("driver", "copy", "nobody", None, seccomp=False)
    with pytest.raises(ConfigError, match="has no backend to run in a driver domain"):
        build_device(DeviceSpec("quiet", tmp_path / "q.sock", domain=DomainSpec("driver")))


async def test_vdev_run_serves_from_a_driver_domain(
    image: Path, vdev_daemon: DaemonFactory
) -> None:
    """The daemon as a user starts it: `vdev run ... --domain driver`, then SIGTERM."""
    args = ["blk", "--backend", "file", "--path", str(image)]
    daemon = await vdev_daemon(*args, "--domain", "driver", "--domain-memory", "copy")
    data = os.urandom(8 * SECTOR)
    async with Frontend.connect(daemon.socket) as fe:
        await fe.negotiate()
        q = await fe.setup_queue(0)
        write = await transact(q, [header(RequestType.OUT, 0), data], [1])
        read = await transact(q, [header(RequestType.IN, 0)], [len(data), 1])
    tasks = Path(f"/proc/{daemon.process.pid}/task")
    children = [c for t in tasks.iterdir() for c in (t / "children").read_text().split()]
    assert await daemon.stop() == 0
    errors = daemon.log_text()
    assert status(write) == status(read) == Status.OK and read.data[0] == data
    assert not daemon.socket.exists()
    assert len(children) == 1 and not Path(f"/proc/{children[0]}").exists()
    assert "running as pid" in errors and "exited with status 0" in errors


@pytest.mark.parametrize("memory", POLICIES)
async def test_scattered_requests(tmp_path: Path, image: Path, memory: str) -> None:
    """Requests of 300 scattered buffers: more than a segment table holds, so each
    crosses as several requests (map), or is gathered into the bounce area (copy)."""
    device = blk_in_domain(tmp_path / "sg.sock", "file", {"path": str(image)}, memory=memory)
    chunks = [os.urandom(SECTOR) for _ in range(300)]
    async with (
        serve_device(device, tmp_path / "sg.sock") as path,
        Frontend.connect(path, mem_size=16 << 20) as fe,
    ):
        await fe.negotiate()
        q = await fe.setup_queue(0, size=512)
        write = await transact(q, [header(RequestType.OUT, 64), *chunks], [1])
        read = await transact(q, [header(RequestType.IN, 64)], [SECTOR] * 300 + [1])
    assert status(write) == status(read) == Status.OK
    assert read.data[:-1] == chunks
    device.close()
    assert image.read_bytes()[64 * SECTOR : 364 * SECTOR] == b"".join(chunks)


async def test_concurrent_batches_run_side_by_side(
    tmp_path: Path, image: Path, plugins: None
) -> None:
    """A backend taking three calls at once gets three lanes: the batches of three
    queues meet inside the child (each read waits for the other two)."""
    data = os.urandom(3 * SECTOR)
    image.write_bytes(data + bytes(IMAGE_SIZE - len(data)))
    device = blk_in_domain(tmp_path / "b.sock", "barrier", {"path": str(image)})
    proxy = device.backend
    memory = FakeGuestMemory(1 << 20, memfd=True)
    proxy.memory_changed(memory)
    buffers = [memory.gpa_view(memory.alloc(SECTOR), SECTOR) for _ in range(3)]
    reads = [BlkRequest(RequestType.IN, i * SECTOR, [buffers[i]], SECTOR) for i in range(3)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:  # three queues' worker threads
            for i in range(3):
                nursery.start_soon(trio.to_thread.run_sync, proxy.executor(i).run, [reads[i]])
    assert [r.status for r in reads] == [Status.OK] * 3
    assert b"".join(bytes(b) for b in buffers) == data
    pid = host_of(device).pid
    assert len(os.listdir(f"/proc/{pid}/task")) == 1 + 1 + 3  # main, sync ring, lanes
    device.close()
    memory.close()
