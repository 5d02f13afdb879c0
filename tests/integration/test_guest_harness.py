"""The real-guest harness (vdev.testing.guest) and QEMU command building (vdev.qemu).

Boot tests run a real Linux guest under QEMU; they skip only when qemu-system-x86_64 is
absent. The first run downloads the Debian kernel package (apt) into the vdev cache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import socket
import struct
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from vdev import qemu
from vdev.qemu import GuestCommand, QemuError, choose_accel, mem_mib, render_args
from vdev.testing.guest import (
    GuestError,
    GuestPanic,
    GuestTimeout,
    build_guest,
    run_guest,
    start_guest,
)

MiB = 1 << 20
VHOST_USER_HEADER = struct.Struct("<III")  # request, flags, payload size
VHOST_USER_GET_FEATURES = 1
VHOST_USER_VERSION = 1

# Every template with the parameters its placeholders need: a new placeholder fails here.
TEMPLATE_PARAMS = {
    "memory": {"mem_size": "512M"},
    "vdev-blk": {"id": "blk0", "socket": "/run/vdev/blk0.sock", "queues": 2},
    "vdev-blk-reconnect": {
        "id": "blk0",
        "socket": "/run/vdev/blk0.sock",
        "queues": 1,
        "packed": False,
    },
    "vdev-blk-server": {
        "id": "blk0",
        "socket": "/run/vdev/blk0.sock",
        "queues": 1,
        "packed": True,
    },
    "vdev-net": {"id": "net0", "socket": "/run/vdev/net0.sock", "queues": 2, "mq": True},
    "builtin-blk": {"id": "disk0", "path": "/var/tmp/disk.img", "queues": 1, "direct": True},
    "builtin-net-tap": {"id": "net0", "tap": "tap0", "queues": 1, "mq": False},
}


# --- templates and command lines (no QEMU needed) ---------------------------------------


def test_template_set_is_documented() -> None:
    assert qemu.template_names() == sorted(TEMPLATE_PARAMS)
    readme = (qemu.configs_dir() / "README.md").read_text()
    for name in [*TEMPLATE_PARAMS, "vdev-memory", "vdev-blk", "vdev-net"]:
        assert name in readme


@pytest.mark.parametrize("name", sorted(TEMPLATE_PARAMS))
def test_every_template_renders(name: str) -> None:
    args = render_args(name, **TEMPLATE_PARAMS[name])
    assert args
    assert all(arg and "{" not in arg and not arg.startswith("#") for arg in args)
    assert args[0].startswith("-")


def test_render_vdev_blk() -> None:
    args = render_args("vdev-blk", id="blk0", socket="/tmp/a,b.sock", queues=4)
    assert args == [
        "-chardev",
        "socket,id=blk0-chr,path=/tmp/a,,b.sock",
        "-device",
        "vhost-user-blk-pci,chardev=blk0-chr,id=blk0,num-queues=4",
    ]


def test_render_vdev_net_multiqueue_uses_legacy_interrupts() -> None:
    args = render_args("vdev-net.args", id="n", socket="/s", queues=4, mq=True)
    assert "vhost-user,id=n-net,chardev=n-chr,queues=4" in args
    (device,) = [arg for arg in args if arg.startswith("virtio-net-pci,")]
    assert "mq=on" in device.split(",")
    assert "vectors=0" in device.split(",")


def test_render_names_missing_placeholder() -> None:
    with pytest.raises(QemuError, match=r"\{queues\}"):
        render_args("vdev-blk", id="blk0", socket="/s")


def test_render_rejects_unknown_parameter() -> None:
    with pytest.raises(QemuError, match="sokcet"):
        render_args("vdev-blk", id="blk0", socket="/s", queues=1, sokcet="/t")


def test_render_unknown_template_lists_known_ones() -> None:
    with pytest.raises(QemuError, match="vdev-blk"):
        render_args("no-such-template")


@pytest.mark.parametrize(
    ("mem", "mib"), [(1 << 30, 1024), ("512M", 512), ("2G", 2048), ("1.5GiB", 1536)]
)
def test_mem_mib(mem: str | int, mib: int) -> None:
    assert mem_mib(mem) == mib


@pytest.mark.parametrize("mem", ["lots", "512", "1000K", "0", -1])
def test_mem_mib_rejects(mem: str | int) -> None:
    with pytest.raises(ValueError):
        mem_mib(mem)


def test_guest_command_argv() -> None:
    extra = render_args("vdev-blk", id="blk0", socket="/s", queues=1)
    command = GuestCommand(
        Path("/k"), Path("/i"), mem="1G", cpus=2, accel="kvm", extra_args=[extra], qemu="/q"
    )
    argv = command.argv()
    assert argv[0] == "/q"
    assert {"-nodefaults", "-no-reboot"} <= set(argv)
    pairs = dict(itertools.pairwise(argv))
    assert pairs["-m"] == "1024M"
    assert pairs["-object"] == "memory-backend-memfd,id=mem,size=1024M,share=on"
    assert pairs["-machine"] == "memory-backend=mem"
    assert pairs["-accel"] == "kvm"
    assert pairs["-cpu"] == "host"
    assert pairs["-smp"] == "2"
    assert (pairs["-kernel"], pairs["-initrd"]) == ("/k", "/i")
    assert pairs["-serial"] == "stdio"
    assert "console=ttyS0" in pairs["-append"].split()
    assert argv[-len(extra) :] == extra


def test_guest_command_tcg_has_no_host_cpu() -> None:
    argv = GuestCommand(Path("/k"), qemu="/q").argv()
    assert "-cpu" not in argv
    assert "-initrd" not in argv
    assert argv[argv.index("-accel") + 1] == "tcg"


def test_find_qemu_names_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(QemuError, match=qemu.QEMU_PACKAGE):
        qemu.find_qemu()


@pytest.fixture
def accel_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """A private cache, no VDEV_ACCEL, a usable-looking /dev/kvm and a recording probe."""
    monkeypatch.setenv(qemu.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(qemu.ACCEL_ENV, raising=False)
    monkeypatch.setattr(qemu, "kvm_accessible", lambda: True)
    probed: list[Path] = []

    def fake_probe(kernel: Path, initrd: Path | None = None) -> bool:
        probed.append(kernel)
        return True

    monkeypatch.setattr(qemu, "probe_kvm", fake_probe)
    return probed


def test_choose_accel_explicit_and_env(
    accel_env: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert choose_accel("tcg") == "tcg"
    assert choose_accel("kvm") == "kvm"
    monkeypatch.setenv(qemu.ACCEL_ENV, "tcg")
    assert choose_accel("auto", kernel=Path("/k")) == "tcg"
    assert choose_accel("kvm") == "kvm"  # an explicit request beats the environment
    monkeypatch.setenv(qemu.ACCEL_ENV, "fast")
    with pytest.raises(QemuError, match=qemu.ACCEL_ENV):
        choose_accel()
    with pytest.raises(QemuError, match="accel"):
        choose_accel("xen")
    assert accel_env == []


def test_choose_accel_probes_once_and_caches(accel_env: list[Path]) -> None:
    assert choose_accel() == "tcg"  # nothing to probe with, nothing cached
    assert choose_accel(kernel=Path("/k")) == "kvm"
    assert choose_accel(kernel=Path("/k2")) == "kvm"
    assert choose_accel() == "kvm"
    assert accel_env == [Path("/k")]


def test_choose_accel_without_kvm_device(
    accel_env: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu, "kvm_accessible", lambda: False)
    assert choose_accel(kernel=Path("/k")) == "tcg"
    with pytest.raises(QemuError, match="/dev/kvm"):
        choose_accel("kvm")
    assert accel_env == []


# --- QEMU really parses the vdev templates and talks vhost-user -------------------------


async def _first_vhost_user_message(args: list[str], sock: Path) -> tuple[int, int]:
    """Start a paused QEMU with ``args``; return the (request, flags) it first sends."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(sock))
    listener.listen(1)
    argv = [qemu.find_qemu(), "-nodefaults", "-display", "none", "-S", *args]
    run_qemu = partial(
        trio.run_process,
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )

    async def fail_if_qemu_exits(process: trio.Process) -> None:
        errors = b""
        while chunk := await process.stderr.receive_some():
            errors += chunk
        raise AssertionError(f"QEMU exited without connecting: {errors.decode()}")

    with listener:
        async with trio.open_nursery() as nursery:
            process = await nursery.start(run_qemu)
            nursery.start_soon(fail_if_qemu_exits, process)
            with trio.fail_after(60):
                conn, _ = await listener.accept()
                with conn:
                    header = b""
                    while len(header) < VHOST_USER_HEADER.size:
                        chunk = await conn.recv(VHOST_USER_HEADER.size - len(header))
                        assert chunk, "QEMU closed the vhost-user socket"
                        header += chunk
            nursery.cancel_scope.cancel()
    request, flags, _size = VHOST_USER_HEADER.unpack(header)
    return request, flags


def _memory(size: str = "256M") -> list[str]:
    return ["-m", size, *render_args("memory", mem_size=size)]


@pytest.mark.requires_qemu
async def test_vdev_blk_template_reaches_vhost_user(tmp_path: Path) -> None:
    sock = tmp_path / "blk.sock"
    args = [*_memory(), *render_args("vdev-blk", id="blk0", socket=sock, queues=2)]
    assert await _first_vhost_user_message(args, sock) == (
        VHOST_USER_GET_FEATURES,
        VHOST_USER_VERSION,
    )


@pytest.mark.requires_qemu
async def test_vdev_net_template_reaches_vhost_user(tmp_path: Path) -> None:
    sock = tmp_path / "net.sock"
    args = [*_memory(), *render_args("vdev-net", id="net0", socket=sock, queues=2, mq=True)]
    assert await _first_vhost_user_message(args, sock) == (
        VHOST_USER_GET_FEATURES,
        VHOST_USER_VERSION,
    )


@pytest.mark.requires_qemu
@pytest.mark.parametrize("config", ["vdev-blk.cfg", "vdev-net.cfg"])
async def test_readconfig_files_reach_vhost_user(tmp_path: Path, config: str) -> None:
    original = (qemu.configs_dir() / config).read_text()
    assert "/run/vdev/" in original
    moved = tmp_path / config
    moved.write_text(original.replace("/run/vdev/", f"{tmp_path}/"))
    (sock,) = {line.split('"')[1] for line in moved.read_text().splitlines() if "path" in line}
    memory = qemu.configs_dir() / "vdev-memory.cfg"
    args = ["-readconfig", str(memory), "-readconfig", str(moved)]
    assert await _first_vhost_user_message(args, Path(sock)) == (
        VHOST_USER_GET_FEATURES,
        VHOST_USER_VERSION,
    )


# --- booting the real guest -------------------------------------------------------------


def _supports_o_direct(directory: Path) -> bool:
    probe = directory / ".o_direct"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


def _disk(path: Path, size: int, seed: int) -> tuple[list[str], bytes]:
    """A raw image of random bytes and the QEMU args of a built-in virtio-blk on it."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    direct = _supports_o_direct(path.parent)
    return render_args("builtin-blk", id="disk0", path=path, queues=1, direct=direct), data


@pytest.mark.requires_qemu
async def test_builtin_blk_read_checksum_and_write(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    args, data = _disk(image, 8 * MiB, seed=1234)
    offset, length, write_at, patch = 3_000_001, 100_000, 1_234_567, b"vdev-was-here"
    script = f"""
        set -e
        cat /sys/block/vda/size
        dd if=/dev/vda bs=1M 2>/dev/null | sha256sum
        dd if=/dev/vda bs=4096 skip={offset} count={length} \\
            iflag=skip_bytes,count_bytes 2>/dev/null | sha256sum
        printf '{patch.decode()}' | dd of=/dev/vda bs=4096 seek={write_at} \\
            oflag=seek_bytes conv=notrunc 2>/dev/null
    """
    result = await run_guest(script, qemu_args=args)
    assert result.exit_code == 0, result.console
    sectors, whole, part = (line.split()[0] for line in result.output.splitlines())
    assert int(sectors) * 512 == len(data)
    assert whole == hashlib.sha256(data).hexdigest()
    assert part == hashlib.sha256(data[offset : offset + length]).hexdigest()
    expected = data[:write_at] + patch + data[write_at + len(patch) :]
    assert image.read_bytes() == expected


@pytest.mark.requires_qemu
async def test_output_and_exit_code_propagate() -> None:
    result = await run_guest("echo out; echo err >&2; printf 'last'; exit 42")
    assert result.exit_code == 42
    assert result.output == "out\nerr\nlast"
    assert "out\nerr\nlast" in result.console


@pytest.mark.requires_qemu
async def test_kernel_panic_is_reported() -> None:
    with pytest.raises(GuestPanic, match="panic") as caught:
        await run_guest("echo c > /proc/sysrq-trigger; sleep 60")
    assert "Kernel panic" in caught.value.console


@pytest.mark.requires_qemu
async def test_timeout_kills_qemu() -> None:
    with pytest.raises(GuestTimeout, match="guest console"):
        await run_guest("sleep 600", timeout=1.0)


@pytest.mark.requires_qemu
async def test_leaving_start_guest_kills_qemu() -> None:
    async with start_guest("echo ready; sleep 600") as guest:
        with trio.fail_after(120):
            await guest.wait_for("ready")
        pid = guest.pid
        os.kill(pid, 0)  # running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped: no orphan, no zombie


@pytest.mark.requires_qemu
async def test_early_qemu_exit_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    args = render_args("builtin-blk", id="d", path=missing, queues=1, direct=False)
    with pytest.raises(GuestError, match="QEMU stderr") as caught:
        await run_guest("true", qemu_args=args)
    assert "missing.img" in str(caught.value)


@pytest.mark.requires_qemu
async def test_fio_runs_in_guest(tmp_path: Path) -> None:
    image = await build_guest(extra_binaries=["fio"])
    args, _ = _disk(tmp_path / "disk.img", 16 * MiB, seed=7)
    script = """
        fio --eta=never --output-format=json --output=/tmp/fio.json \\
            --filename=/dev/vda --direct=1 --ioengine=libaio --size=16M \\
            --name=randread --rw=randread --bs=4k --iodepth=32 --runtime=1 --time_based \\
            --name=seqwrite --stonewall --rw=write --bs=1M --iodepth=1
        status=$?
        cat /tmp/fio.json
        exit $status
    """
    result = await run_guest(script, qemu_args=args, image=image)
    assert result.exit_code == 0, result.output
    jobs = {job["jobname"]: job for job in json.loads(result.output)["jobs"]}
    assert jobs["randread"]["error"] == 0
    assert jobs["randread"]["read"]["io_bytes"] > 0
    assert jobs["seqwrite"]["error"] == 0
    assert jobs["seqwrite"]["write"]["io_bytes"] == 16 * MiB


@pytest.mark.requires_qemu
async def test_extra_modules_and_binaries(tmp_path: Path) -> None:
    image = await build_guest(
        extra_binaries=["mkfs.ext4"], extra_modules=["crc32c_generic", "ext4"]
    )
    args, _ = _disk(tmp_path / "disk.img", 32 * MiB, seed=3)
    script = """
        set -e
        mkfs.ext4 -q /dev/vda
        mkdir /mnt && mount -t ext4 /dev/vda /mnt
        echo persisted > /mnt/file && sync
        cat /mnt/file
        umount /mnt
    """
    result = await run_guest(script, qemu_args=args, image=image)
    assert (result.exit_code, result.output) == (0, "persisted\n"), result.console


@pytest.fixture
def tap_and_netns() -> Iterator[tuple[str, str]]:
    """A fresh TAP device in the root namespace and an empty network namespace."""
    from pyroute2 import IPRoute, netns

    suffix = os.getpid() % 100_000
    tap, namespace = f"vdevt{suffix}", f"vdev-test-{suffix}"
    netns.create(namespace)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
        try:
            yield tap, namespace
        finally:
            with IPRoute() as ipr:
                for index in ipr.link_lookup(ifname=tap):
                    ipr.link("del", index=index)
    finally:
        netns.remove(namespace)  # also destroys the TAP if it was moved there


def _move_tap(tap: str, namespace: str, address: str) -> None:
    """Move ``tap`` (QEMU keeps its fd) into ``namespace`` and give it ``address``/24."""
    from pyroute2 import IPRoute, NetNS

    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=tap)
        ipr.link("set", index=index, net_ns_fd=namespace)
    with NetNS(namespace) as ns:
        (index,) = ns.link_lookup(ifname=tap)
        ns.addr("add", index=index, address=address, prefixlen=24)
        ns.link("set", index=index, state="up")


@pytest.mark.requires_qemu
async def test_builtin_net_tap_guest_pings_namespace(tap_and_netns: tuple[str, str]) -> None:
    # The host end of the TAP lives in a namespace of its own: test traffic stays there.
    tap, namespace = tap_and_netns
    args = render_args("builtin-net-tap", id="net0", tap=tap, queues=1, mq=False)
    script = """
        ip link set eth0 up && ip addr add 10.77.0.2/24 dev eth0 || exit 2
        echo "eth0 is up"
        for attempt in 1 2 3 4 5 6 7 8 9 10; do
            ping -c 1 -W 2 10.77.0.1 && exit 0
        done
        exit 1
    """
    async with start_guest(script, qemu_args=args) as guest:
        with trio.fail_after(120):
            await guest.wait_for("eth0 is up")
            await trio.to_thread.run_sync(_move_tap, tap, namespace, "10.77.0.1")
            result = await guest.wait()
    assert result.exit_code == 0, result.output
    assert "1 packets received" in result.output
