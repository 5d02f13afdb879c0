"""Regression tests for the server side of the hardening issue (11)."""

from __future__ import annotations

import logging
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import pytest
import trio
from vdev_backends.blk_ram import RamBackend
from vdev_backends.net_echo import EchoBackend

from vdev.devices.base import Device, Queue
from vdev.devices.blk import BlkDevice
from vdev.devices.net import NetDevice
from vdev.protocol import (
    MemoryRegion,
    MemoryRegionUpdate,
    MemoryTable,
    ProtocolFeature,
    Request,
    VringFile,
    VringState,
)
from vdev.server import ERROR_BURST, MAX_MEM_SLOTS, DeviceServer, ErrorLog
from vdev.testing.fakemem import FakeGuestMemory
from vdev.testing.frontend import Frontend, FrontendQueue, serve_device
from vdev.testing.pytest_plugin import GuestRunner


class EchoDevice(Device):
    """A raw device: copies each chain's readable bytes into its writable buffers."""

    device_id = 0x7F

    def __init__(self, num_queues: int = 2) -> None:
        super().__init__(num_queues=num_queues)

    def handle(self, queue: Queue) -> None:
        while (chain := queue.pop()) is not None:
            queue.push(chain, chain.write_into(b"".join(bytes(v) for v in chain.readable)))
        queue.notify()


async def echo_works(fe: Frontend, index: int = 0) -> None:
    used = await (await fe.setup_queue(index)).transact([b"ping"], [4])
    assert used.data == [b"ping"]


@pytest.mark.parametrize(
    ("device", "config"),
    [(BlkDevice(RamBackend(1 << 20)), True), (NetDevice(EchoBackend()), False)],
    ids=["blk", "net"],
)
async def test_config_protocol_feature_per_device_type(
    tmp_path: Path, device: Device, config: bool
) -> None:
    async with serve_device(device, tmp_path / "dev.sock") as path, Frontend.connect(path) as fe:
        await fe.send(Request.SET_OWNER)
        msg = await fe.send(Request.GET_PROTOCOL_FEATURES)
    assert msg is not None and isinstance(msg.payload, int)
    assert bool(msg.payload & ProtocolFeature.CONFIG) == config
    assert msg.payload & ProtocolFeature.REPLY_ACK


# --- item 2: memory slots and fd exhaustion ---------------------------------------------


async def test_mem_slot_limit_then_another_device_accepts(tmp_path: Path) -> None:
    async with (
        serve_device(EchoDevice(), tmp_path / "a.sock") as path_a,
        serve_device(EchoDevice(), tmp_path / "b.sock") as path_b,
        Frontend.connect(path_a) as fe,
    ):
        await fe.negotiate()
        msg = await fe.send(Request.GET_MAX_MEM_SLOTS)
        assert msg is not None and msg.payload == MAX_MEM_SLOTS == 509
        fd = os.memfd_create("vdev-slot", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4096)
        try:
            acks = []
            for i in range(600):
                region = MemoryRegion((1 << 40) + (i << 12), 4096, (1 << 45) + (i << 12), 0)
                update = MemoryRegionUpdate(region)
                msg = await fe.send(Request.ADD_MEM_REG, update, [fd], need_reply=True)
                assert msg is not None
                acks.append(msg.payload)
        finally:
            os.close(fd)
        free = MAX_MEM_SLOTS - len(fe.memory.regions)
        assert acks == [0] * free + [1] * (600 - free)
        await echo_works(fe)  # the session lives on
        async with Frontend.connect(path_b) as fe_b:
            await fe_b.negotiate()
            await echo_works(fe_b)


@contextmanager
def fds_exhausted() -> Iterator[None]:
    """Lower the soft fd limit and open fds until none is left; undo on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))), hard))
    try:
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                break
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_accept_waits_out_fd_exhaustion(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="vdev.server")
    async with serve_device(EchoDevice(), tmp_path / "d.sock") as path:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        memory = FakeGuestMemory(1 << 20, memfd=True, user_offset=1 << 45)
        with sock, memory:
            with fds_exhausted():
                await sock.connect(str(path))
                await trio.sleep(0.35)  # accept() fails with EMFILE, a few times
            fe = Frontend(sock, memory)
            await fe.negotiate()
            await echo_works(fe)
            fe.close()
    failures = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(failures) == 1 and "Too many open files" in failures[0].getMessage()
    assert any("accepting front-ends again" in r.getMessage() for r in caplog.records)


def _lower_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


async def test_run_raises_the_fd_limit(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard <= 256:
        pytest.skip(f"the hard open file limit ({hard}) leaves nothing to raise")
    sock = tmp_path / "disk.sock"
    argv = ["run", "blk", "--socket", str(sock), "--backend", "ram", "--size", "1M"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vdev.cli", *argv],
        stderr=subprocess.DEVNULL,
        preexec_fn=_lower_fd_limit,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            await trio.sleep(0.05)
        limits = Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
        [line] = [line for line in limits if line.startswith("Max open files")]
        assert line.split()[3:5] == [str(hard), str(hard)]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- item 8: a ring that cannot restart fails alone --------------------------------------


async def _rings_in_two_regions(fe: Frontend) -> tuple[FrontendQueue, int]:
    """Queue 0 in region 0, queue 1 in region 1; return queue 1 and queue 0's err eventfd."""
    await fe.negotiate()
    q0 = await fe.setup_queue(0)
    for _ in range(2):  # the second one and what follows land in region 1
        fe.memory.alloc(fe.memory.region_size // 2)
    q1 = await fe.setup_queue(1)
    err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    await fe.send(Request.SET_VRING_ERR, VringFile(0, True), [err_fd], need_reply=True)
    for q in (q0, q1):
        assert (await q.transact([b"before"], [6])).data == [b"before"]
    return q1, err_fd


def _region(fe: Frontend, index: int, mmap_offset: int | None = None) -> MemoryRegion:
    r = fe.memory.regions[index]
    offset = r.mmap_offset if mmap_offset is None else mmap_offset
    return MemoryRegion(r.guest_phys_addr, r.size, r.user_addr, offset)


async def _only_queue_0_failed(q1: FrontendQueue, err_fd: int, caplog) -> None:
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(err_fd)
    assert os.eventfd_read(err_fd) == 1
    os.close(err_fd)
    assert (await q1.transact([b"after"], [5], timeout=5)).data == [b"after"]
    failed = [r.getMessage() for r in caplog.records if "cannot restart" in r.getMessage()]
    assert len(failed) == 1 and failed[0].startswith("queue 0: "), failed


async def test_rem_mem_reg_fails_only_the_rings_in_that_region(tmp_path: Path, caplog) -> None:
    async with (
        serve_device(EchoDevice(), tmp_path / "d.sock") as path,
        Frontend.connect(path) as fe,
    ):
        q1, err_fd = await _rings_in_two_regions(fe)
        update = MemoryRegionUpdate(_region(fe, 0))
        msg = await fe.send(Request.REM_MEM_REG, update, need_reply=True)
        assert msg is not None and msg.payload == 0
        await _only_queue_0_failed(q1, err_fd, caplog)


async def test_failed_set_mem_table_fails_only_the_unmapped_rings(tmp_path: Path, caplog) -> None:
    async with (
        serve_device(EchoDevice(), tmp_path / "d.sock") as path,
        Frontend.connect(path) as fe,
    ):
        q1, err_fd = await _rings_in_two_regions(fe)
        # Region 1 maps; region 0 lies beyond the end of its memfd and does not.
        table = MemoryTable((_region(fe, 1), _region(fe, 0, mmap_offset=1 << 30)))
        fds = [fe.memory.regions[1].fd, fe.memory.regions[0].fd]
        msg = await fe.send(Request.SET_MEM_TABLE, table, fds, need_reply=True)
        assert msg is not None and msg.payload == 1
        await _only_queue_0_failed(q1, err_fd, caplog)


# --- smaller items: logging -------------------------------------------------------------


@pytest.mark.parametrize(("flags", "library"), [(["-v"], False), (["-vv"], True)])
def test_verbose_is_debug_for_vdev_and_twice_for_libraries(flags: list[str], library: bool) -> None:
    code = (
        "import logging, sys\n"
        "from vdev.cli import main\n"
        "main([*sys.argv[1:], 'backends'])\n"
        "for name in ('vdev.server', 'vdev_backends.net_tap', 'pyroute2.ndb'):\n"
        "    logging.getLogger(name).debug('debug from %s', name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *flags], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "debug from vdev.server" in result.stderr
    assert "debug from vdev_backends.net_tap" in result.stderr
    assert ("debug from pyroute2.ndb" in result.stderr) == library


async def test_hang_up_before_the_ack_is_an_ordinary_disconnect(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="vdev.server")
    async with serve_device(EchoDevice(), tmp_path / "d.sock") as path:
        async with Frontend.connect(path) as fe:
            await fe.negotiate()
            # Ask for an ack and hang up at once (no checkpoint between): the device's
            # reply meets a closed socket.
            os.write(fe.sock.fileno(), fe.conn.send(Request.SET_OWNER, need_reply=True))
            fe.sock.close()
            with trio.fail_after(5):
                while not any("disconnected" in r.getMessage() for r in caplog.records):
                    await trio.sleep(0.01)
        async with Frontend.connect(path) as fe:  # the device serves the next one
            await fe.negotiate()
            await echo_works(fe)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    [line] = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert "before reading a reply" in line


async def test_errors_of_a_hostile_session_are_rate_limited(tmp_path: Path, caplog) -> None:
    server = DeviceServer(EchoDevice(), tmp_path / "d.sock")
    server.errors = ErrorLog(str(server.path), window=60.0)  # no new window on a slow machine
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with Frontend.connect(server.path) as fe:
            await fe.negotiate()
            for _ in range(100):  # ring 9 does not exist: a failure ack each time
                msg = await fe.send(Request.SET_VRING_BASE, VringState(9, 0), need_reply=True)
                assert msg is not None and msg.payload == 1
            await echo_works(fe)
        nursery.cancel_scope.cancel()  # the server stops: the count is logged
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == ERROR_BURST + 1
    assert all("ring index 9 out of range" in line for line in errors[:ERROR_BURST])
    assert errors[-1].endswith(f"suppressed {100 - ERROR_BURST} error messages")


# --- item 15: qemu-args -------------------------------------------------------------------


def qemu_args(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "vdev.cli", "qemu-args", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def _option(argv: list[str], name: str, prefix: str) -> str:
    """The value of the `name` argument that starts with `prefix`."""
    [value] = [v for o, v in pairwise(argv) if o == name and v.startswith(prefix)]
    return value


@pytest.mark.parametrize(("mem", "size"), [(None, "1G"), ("512M", "512M"), ("1536m", "1536M")])
def test_qemu_args_prints_m_equal_to_the_backend_size(mem: str | None, size: str) -> None:
    argv = qemu_args("blk", "--socket", "/tmp/d.sock", *(["--mem", mem] if mem else []))
    backend = _option(argv, "-object", "memory-backend-memfd,")
    assert argv[:2] == ["-m", size]
    assert f",size={size}," in backend


def test_qemu_args_gives_nics_a_mac() -> None:
    nic = _option(qemu_args("net", "--socket", "/tmp/n.sock"), "-device", "virtio-net-pci,")
    mac = nic.split(",mac=")[1]
    assert mac.startswith("52:54:00:") and mac != "52:54:00:12:34:56"  # not QEMU's default
    assert qemu_args("net", "--socket", "/tmp/n.sock")[-1] == nic  # stable
    assert _option(qemu_args("net", "--socket", "/tmp/other.sock"), "-device", "v") != nic
    given = qemu_args("net", "--socket", "/tmp/n.sock", "--mac", "02:00:00:00:00:AA")
    assert _option(given, "-device", "virtio-net-pci,").endswith(",mac=02:00:00:00:00:aa")


@pytest.mark.parametrize("args", [["--mem", "1000K"], ["--mem", "lots"], ["--mac", "zz"]])
def test_qemu_args_bad_option_is_one_line(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vdev.cli", "qemu-args", "net", "--socket", "s", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert args[0] in line


@pytest.mark.requires_qemu
async def test_a_guest_boots_with_qemu_args_as_printed(
    tmp_path: Path, vdev_guest: GuestRunner
) -> None:
    server = DeviceServer(BlkDevice(RamBackend(1 << 20)), tmp_path / "disk.sock")
    argv = qemu_args("blk", "--socket", str(server.path), "--mem", "512M")
    script = "grep MemTotal /proc/meminfo\ndd if=/dev/vda bs=4096 count=1 2>/dev/null | wc -c\n"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        result = await vdev_guest(script, qemu_args=argv, mem=None)  # no memory of its own
        nursery.cancel_scope.cancel()
    assert result.exit_code == 0, result.console
    meminfo, read = result.output.split("\n")[:2]
    assert 400_000 < int(meminfo.split()[1]) <= 512 * 1024  # kB: the 512M it printed
    assert read.strip() == "4096"
