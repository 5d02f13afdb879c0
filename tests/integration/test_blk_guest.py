"""virtio-blk served by vdev to a real Linux guest under QEMU, and `vdev demo`.

QEMU is started from the qemu-configs templates (`render_args`), the guest runs a busybox
script, and the host checks the image file afterwards. The guest tests skip only when
qemu-system-x86_64 is absent.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from vdev_backends.blk_file import FileBackend

from vdev.demo import DemoDevice, guest_script, split_sections
from vdev.devices.base import Device
from vdev.devices.blk import BlkDevice
from vdev.qemu import render_args
from vdev.server import DeviceServer
from vdev.testing.guest import EXTRA_BIN_DIR, GuestResult
from vdev.testing.pytest_plugin import DaemonFactory, GuestRunner
from vdev.trioutil import unwrap_single

KiB, MiB = 1 << 10, 1 << 20
SIZE = 32 * MiB
SECTOR = 512
PAGE = 4096
#: (offset, length) of the guest's writes: sector-aligned for O_DIRECT, one of them
#: not 4 KiB-aligned, one large enough to need many segments, one the very last sector.
WRITES = [
    (0, 4 * KiB),
    (MiB + 3 * SECTOR, 64 * KiB + SECTOR),
    (7 * MiB + 4 * KiB, 300 * KiB),
    (SIZE - 129 * SECTOR, 64 * KiB),
    (SIZE - SECTOR, SECTOR),
]


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def supports_o_direct(directory: Path) -> bool:
    probe = directory / ".o_direct"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


def make_image(path: Path, seed: int) -> bytes:
    """A fully allocated image of random bytes; returns its content."""
    data = random_bytes(SIZE, seed)
    path.write_bytes(data)
    return data


def blk_args(sock: Path, queues: int = 1) -> list[str]:
    return render_args("vdev-blk", id="disk0", socket=sock, queues=queues)


def write_script(chunks: Sequence[tuple[int, bytes]]) -> str:
    """Guest commands: write each chunk at its offset with O_DIRECT, read it back the
    same way and print its sha256, one line per chunk. (busybox dd page-aligns its
    buffer, as O_DIRECT needs, only when bs is at least a page; with a smaller one it
    silently falls back to buffered I/O.)"""
    lines = []
    for n, (offset, data) in enumerate(chunks):
        encoded = base64.encodebytes(data).decode()
        lines += [
            f"base64 -d > /tmp/chunk{n} <<'EOF'",
            encoded + "EOF",
            f"dd if=/tmp/chunk{n} of=/dev/vda bs={max(len(data), PAGE)} seek={offset} "
            "oflag=seek_bytes,direct conv=notrunc 2>/dev/null",
        ]
    for offset, data in chunks:
        lines.append(
            f"dd if=/dev/vda bs={max(len(data), PAGE)} count={len(data)} skip={offset} "
            "iflag=skip_bytes,count_bytes,direct 2>/dev/null | sha256sum"
        )
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def serving(device: BlkDevice, sock: Path) -> AsyncIterator[BlkDevice]:
    """`device` served in this process on `sock` for the block's duration."""
    try:
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                await nursery.start(DeviceServer(device, sock).serve)
                yield device
                nursery.cancel_scope.cancel()
    finally:
        device.close()


def assert_ok(result: GuestResult) -> list[str]:
    assert result.exit_code == 0, result.console
    return result.output.splitlines()


@pytest.mark.requires_qemu
async def test_cli_daemon_guest_writes_land_in_the_image(
    tmp_path: Path, vdev_daemon: DaemonFactory, vdev_guest: GuestRunner
) -> None:
    image = tmp_path / "disk.img"
    expected = bytearray(make_image(image, seed=1))
    chunks = [(offset, random_bytes(length, offset)) for offset, length in WRITES]
    for offset, data in chunks:
        expected[offset : offset + len(data)] = data
    args = ["blk", "--backend", "file", "--path", str(image)]
    args += ["--serial", "vdev-cli-disk"]
    if supports_o_direct(tmp_path):
        args.append("--direct")
    script = "set -e\ncat /sys/block/vda/size /sys/block/vda/serial; echo\n"
    script += write_script(chunks)
    script += "dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | sha256sum\n"

    daemon = await vdev_daemon(*args)
    result = await vdev_guest(script, qemu_args=blk_args(daemon.socket))
    assert await daemon.stop() == 0, daemon.log_text()
    assert not daemon.socket.exists()

    sectors, serial, *sums, whole = assert_ok(result)
    assert int(sectors) * SECTOR == SIZE
    assert serial == "vdev-cli-disk"
    assert [line.split()[0] for line in sums] == [sha256(data) for _, data in chunks]
    assert whole.split()[0] == sha256(bytes(expected))
    assert image.read_bytes() == expected


@pytest.mark.requires_qemu
async def test_read_only_disk_refuses_guest_writes(tmp_path: Path, vdev_guest: GuestRunner) -> None:
    image = tmp_path / "disk.img"
    original = make_image(image, seed=2)
    sock = tmp_path / "ro.sock"
    script = """
        cat /sys/block/vda/ro
        dd if=/dev/urandom of=/dev/vda bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null
        echo "direct write rc=$?"
        dd if=/dev/urandom of=/dev/vda bs=4096 count=1 seek=100 conv=notrunc,fsync 2>/dev/null
        echo "buffered write rc=$?"
        dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | sha256sum
    """
    async with serving(BlkDevice(FileBackend(image, readonly=True)), sock) as device:
        result = await vdev_guest(script, qemu_args=blk_args(sock))
    ro, direct, buffered, whole = assert_ok(result)
    assert ro == "1"
    assert direct != "direct write rc=0"
    assert buffered != "buffered write rc=0"
    assert whole.split()[0] == sha256(original)
    assert image.read_bytes() == original
    stats = device.stats()
    assert stats["in_requests"] > 0
    assert stats["out_requests"] == stats["write_zeroes_requests"] == 0


def allocated_ranges(path: Path) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of `path` that hold data (not holes)."""
    ranges = []
    with path.open("rb") as f:
        fd, size, offset = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, offset))
    return ranges


@pytest.mark.requires_qemu
async def test_flush_and_discard_reach_the_host(tmp_path: Path, vdev_guest: GuestRunner) -> None:
    image = tmp_path / "disk.img"
    original = make_image(image, seed=3)
    assert allocated_ranges(image) == [(0, SIZE)]
    sock = tmp_path / "flush.sock"
    cached_at, cached = 2 * MiB, random_bytes(256 * KiB, seed=4)
    discard_at, discard_len = 8 * MiB, 4 * MiB
    zero_at, zero_len = 16 * MiB, MiB
    # The guest waits for the host between steps: the host writes "go<N>" into the
    # last sector, the guest polls it with O_DIRECT reads.
    script = f"""
        set -e
        cat /sys/block/vda/queue/write_cache
        wait_host() {{
            until dd if=/dev/vda bs={PAGE} count={SECTOR} skip={SIZE - SECTOR} \\
                iflag=skip_bytes,count_bytes,direct 2>/dev/null | grep -q "go$1"
            do sleep 0.1; done
        }}
        echo 360000 > /proc/sys/vm/dirty_expire_centisecs
        exec 3</dev/vda  # the last close of a block device writes its cache back
        base64 -d > /tmp/cached <<'EOF'
{base64.encodebytes(cached).decode()}EOF
        dd if=/tmp/cached of=/dev/vda bs=64k seek={cached_at} oflag=seek_bytes \\
            conv=notrunc 2>/dev/null
        echo "cached write done"
        wait_host 1
        sync /dev/vda
        echo "synced"
        wait_host 2
        blkdiscard -o {discard_at} -l {discard_len} /dev/vda
        # util-linux blkdiscard: busybox's (which the shell prefers) has no -z
        {EXTRA_BIN_DIR}/blkdiscard -z -o {zero_at} -l {zero_len} /dev/vda
        echo "discarded"
    """

    def image_slice(offset: int, length: int) -> bytes:
        with image.open("rb") as f:
            f.seek(offset)
            return f.read(length)

    def tell_guest(step: int) -> None:
        with image.open("r+b") as f:
            f.seek(SIZE - SECTOR)
            f.write(f"go{step}".encode())

    async with (
        serving(BlkDevice(FileBackend(image)), sock) as device,
        vdev_guest.start(script, qemu_args=blk_args(sock), extra_binaries=["blkdiscard"]) as guest,
    ):
        with trio.fail_after(120):
            await guest.wait_for("cached write done")
            # The data sits in the guest's page cache: nothing reached the host yet.
            assert image_slice(cached_at, len(cached)) != cached
            flushes = device.stats()["flush_requests"]
            tell_guest(1)
            await guest.wait_for("synced")
            assert image_slice(cached_at, len(cached)) == cached
            assert device.stats()["flush_requests"] > flushes
            tell_guest(2)
            result = await guest.wait()
    assert assert_ok(result)[0] == "write back"
    stats = device.stats()
    assert stats["discard_requests"] > 0 and stats["write_zeroes_requests"] > 0
    assert stats["errors"] == 0
    holes_end = discard_at + discard_len
    data = allocated_ranges(image)
    assert not any(start < holes_end and end > discard_at for start, end in data), data
    assert image_slice(discard_at, discard_len) == bytes(discard_len)
    assert image_slice(zero_at, zero_len) == bytes(zero_len)
    # Everything else is as before (but the cached write and the host's marker).
    content = bytearray(image.read_bytes())
    content[cached_at : cached_at + len(cached)] = original[cached_at : cached_at + len(cached)]
    content[discard_at:holes_end] = original[discard_at:holes_end]
    content[zero_at : zero_at + zero_len] = original[zero_at : zero_at + zero_len]
    content[SIZE - SECTOR :] = original[SIZE - SECTOR :]
    assert content == original


@pytest.mark.requires_qemu
async def test_two_queues_with_two_vcpus_both_carry_requests(
    tmp_path: Path, vdev_guest: GuestRunner
) -> None:
    image = tmp_path / "disk.img"
    original = make_image(image, seed=5)
    sock = tmp_path / "mq.sock"
    # One reader pinned to each vCPU: blk-mq maps each CPU to its own queue.
    script = """
        set -e
        ls -1 /sys/block/vda/mq
        for cpu in 0 1; do
            taskset -c $cpu dd if=/dev/vda bs=64k count=64 skip=$((cpu * 64)) iflag=direct \\
                2>/dev/null | sha256sum > /tmp/sum$cpu &
        done
        wait
        cat /tmp/sum0 /tmp/sum1
    """
    device = BlkDevice(FileBackend(image), queues=2)
    async with serving(device, sock):
        result = await vdev_guest(script, qemu_args=blk_args(sock, queues=2), cpus=2)
    mq0, mq1, sum0, sum1 = assert_ok(result)
    assert (mq0, mq1) == ("0", "1")
    assert sum0.split()[0] == sha256(original[: 4 * MiB])
    assert sum1.split()[0] == sha256(original[4 * MiB : 8 * MiB])
    stats = device.stats()
    assert stats["queue0_requests"] > 0 and stats["queue1_requests"] > 0, stats


# --- vdev demo ----------------------------------------------------------------------------


def test_demo_script_runs_every_fragment_and_fails_on_any() -> None:
    fragments = {"a": "echo one\nfalse\necho never", "b": "echo two", "c": "exit 3"}
    devices = [
        DemoDevice(name, name, Device(), Path("/s"), [], script)
        for name, script in fragments.items()
    ]
    shell = shutil.which("busybox")
    argv = [shell, "sh", "-c"] if shell else ["/bin/sh", "-c"]
    done = subprocess.run([*argv, guest_script(devices)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "never" not in done.stdout  # set -e stops a fragment at its first failure
    assert "a: FAILED (status 1)" in done.stdout and "c: FAILED (status 3)" in done.stdout
    sections = split_sections(done.stdout, list(fragments))
    assert sections["a"].startswith("one") and sections["b"] == "two"


@pytest.mark.requires_qemu
async def test_vdev_demo(tmp_path: Path) -> None:
    kept = tmp_path / "kept.img"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    argv = [sys.executable, "-m", "vdev.cli", "-q", "demo", "--keep-image", str(kept)]
    done = await trio.run_process(
        argv,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "mounted again: all 16 files read back from the disk match" in out
    assert "requests: " in out and "errors 0" in out and "MiB written" in out
    assert "debugfs reads hello.txt" in out or "debugfs (e2fsprogs) not installed" in out
    assert out.rstrip().endswith(": OK")
    with kept.open("rb") as f:
        f.seek(1080)
        assert f.read(2) == b"\x53\xef"  # the ext4 superblock the guest made
    assert list(scratch.iterdir()) == []  # temporary files and sockets are gone


@pytest.mark.requires_qemu
async def test_a_4096_byte_sector_disk_is_formatted_and_verified(
    tmp_path: Path, vdev_guest: GuestRunner
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    sock = tmp_path / "4k.sock"
    script = """
        cat /sys/block/vda/queue/logical_block_size
        mkfs.ext4 -q -b 4096 /dev/vda && mkdir -p /mnt/disk && mount -t ext4 /dev/vda /mnt/disk
        head -c 3000000 /dev/urandom > /mnt/disk/data
        sha256sum /mnt/disk/data > /tmp/sum
        umount /mnt/disk && echo 3 > /proc/sys/vm/drop_caches
        mount -t ext4 /dev/vda /mnt/disk && sha256sum -c /tmp/sum >/dev/null && echo verified
        umount /mnt/disk
    """
    async with serving(BlkDevice(FileBackend(image, block_size=4096)), sock) as device:
        result = await vdev_guest(
            script,
            qemu_args=blk_args(sock),
            extra_binaries=["mkfs.ext4"],
            extra_modules=["crc32c_generic", "ext4"],
        )
    assert assert_ok(result) == ["4096", "verified"]
    stats = device.stats()
    assert stats["out_requests"] > 0 and stats["errors"] == 0


@pytest.mark.requires_qemu
async def test_queue_size_64_takes_the_guests_128_descriptor_tables(
    tmp_path: Path, vdev_guest: GuestRunner
) -> None:
    """seg_max 126 lets Linux build 128-entry indirect tables even on a 64-entry queue."""
    image = tmp_path / "disk.img"
    data = make_image(image, seed=5)
    sock = tmp_path / "q64.sock"
    args = [
        a + ",queue-size=64" if a.startswith("vhost-user-blk-pci") else a for a in blk_args(sock)
    ]
    script = "dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | sha256sum\n"
    async with serving(BlkDevice(FileBackend(image)), sock) as device:
        result = await vdev_guest(script, qemu_args=args, timeout=60)
    [digest] = assert_ok(result)
    assert digest.split()[0] == sha256(data[: 16 * MiB])
    assert device.stats()["errors"] == 0
