"""Live migration of a real guest with a vdev disk: two QEMUs (a source and an
``-incoming`` destination), each with its own `vdev run` daemon on the same image file,
``migrate`` over a Unix socket through QMP while the guest works on the disk.

- Writes: each round the guest writes a new 4 KiB block and rewrites one of a few
  slots (O_DIRECT), drops its page cache and reads everything back from the device,
  then, the next round, from the page cache. It stops when the host writes STOP into
  the image, once the destination has served a few rounds; the host then checks every
  block in the image. This proves that the destination resumes each ring where the
  source stopped (QEMU 7.2 sends SET_STATUS 0, then GET_VRING_BASE: with the base lost
  at status 0 the destination hangs) and that no write is lost across the switch-over.
- Reads: each round the guest reads the next window of random data from the device
  into its page cache and compares it, the next round, with the page cache. vdev
  writes those pages on the source while QEMU migrates: only the dirty log makes QEMU
  send them again, and with vdev's marks switched off the guest finds stale pages on
  the destination (3 of 3 runs; the write test alone passed 4 of 4 runs that way).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import trio
from migration_helpers import migrated, qmp_args

from vdev.qemu import render_args
from vdev.testing.guest import Guest
from vdev.testing.pytest_plugin import DaemonFactory, GuestRunner

MiB = 1 << 20
BLOCK = 4096
MAX_BLOCKS = 2000
#: Blocks the guest rewrites round after round (slot n % SLOTS in round n), after the
#: others: their page cache pages change contents from round to round.
SLOTS = 4
SLOT_BLOCK = MAX_BLOCKS
STOP_BLOCK = SLOT_BLOCK + SLOTS
IMAGE_SIZE = 16 * MiB
#: The Debian kernel zeroes every page it allocates (init_on_alloc): a CPU write that
#: QEMU tracks, which would hide any page cache page vdev filled but did not log.
KERNEL_ARGS = "init_on_alloc=0"
#: Rounds the destination must serve before the guest is told to stop.
ROUNDS_AFTER = 5


def block(i: int) -> bytes:
    """Block `i` as the guest writes it (`yes vdev-block-$i | head -c 4096`)."""
    return (f"vdev-block-{i}\n".encode() * BLOCK)[:BLOCK]


SCRIPT = f"""
set -e
n=0
: > /tmp/expect
dd if=/dev/zero of=/tmp/slots bs={BLOCK} count={SLOTS} 2>/dev/null
put() {{  # block $2 of file $1 to block $3 of the disk, synced
    dd if=$1 of=/dev/vda bs={BLOCK} skip=$2 seek=$3 count=1 oflag=direct 2>/dev/null
}}
verify() {{
    dd if=/dev/vda of=/tmp/got bs={BLOCK} count=$n 2>/dev/null
    cmp -s /tmp/got /tmp/expect || {{ echo "MISMATCH $1: blocks"; exit 1; }}
    dd if=/dev/vda of=/tmp/got bs={BLOCK} skip={SLOT_BLOCK} count={SLOTS} 2>/dev/null
    cmp -s /tmp/got /tmp/slots || {{ echo "MISMATCH $1: slots"; exit 1; }}
}}
echo READY
while :; do
    [ $n -eq 0 ] || verify "in the page cache"
    yes "vdev-block-$n" | head -c {BLOCK} >> /tmp/expect
    put /tmp/expect $n $n
    slot=$((n % {SLOTS}))
    yes "vdev-round-$n" | head -c {BLOCK} > /tmp/slot
    dd if=/tmp/slot of=/tmp/slots bs={BLOCK} seek=$slot conv=notrunc 2>/dev/null
    put /tmp/slots $slot $((slot + {SLOT_BLOCK}))
    n=$((n + 1))
    echo 3 > /proc/sys/vm/drop_caches
    stop=$(dd if=/dev/vda bs={BLOCK} skip={STOP_BLOCK} count=1 2>/dev/null | head -c 4)
    verify "from the device"
    echo "round $n"
    [ "$stop" = STOP ] && break
    [ $n -lt {MAX_BLOCKS} ] || {{ echo "never told to stop"; exit 1; }}
done
if dmesg | grep -i -e "i/o error" -e "blk_update_request"; then echo "I/O ERRORS"; exit 1; fi
echo "DONE $n"
"""


def rounds(guest: Guest) -> int:
    """The last round the guest reported (on either QEMU)."""
    found = re.findall(r"^round (\d+)$", guest.console, re.MULTILINE)
    return int(found[-1]) if found else 0


async def until_round(guest: Guest, n: int, timeout: float = 120) -> None:
    """Wait for the guest to report round `n`; AssertionError if its script failed."""
    with trio.move_on_after(timeout):
        while rounds(guest) < n:
            assert "MISMATCH" not in guest.console, guest.console[-2000:]
            await trio.sleep(0.1)
        return
    raise AssertionError(f"no round {n} in {timeout} s:\n{guest.console[-2000:]}")


def disk_args(socket: Path) -> list[str]:
    return render_args("vdev-blk", id="disk0", socket=socket, queues=1)


async def test_a_guest_keeps_writing_and_verifying_its_disk_across_live_migration(
    tmp_path: Path, vdev_daemon: DaemonFactory, vdev_guest: GuestRunner, vdev_socket_dir: Path
) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    source_daemon = await vdev_daemon("blk", "--backend", "file", "--path", str(image))
    target_daemon = await vdev_daemon("blk", "--backend", "file", "--path", str(image))
    args = [*disk_args(source_daemon.socket), *qmp_args(vdev_socket_dir / "qmp-src.sock")]
    async with vdev_guest.start(SCRIPT, qemu_args=args, kernel_args=KERNEL_ARGS) as source:
        with trio.fail_after(120):
            await source.wait_for("READY")
        await until_round(source, 3)  # migrate while the guest works
        target_args = disk_args(target_daemon.socket)
        async with migrated(source, vdev_socket_dir, target_args) as target:
            migrated_at = rounds(target)
            await until_round(target, migrated_at + ROUNDS_AFTER)
            with image.open("r+b") as f:
                f.seek(STOP_BLOCK * BLOCK)
                f.write(b"STOP")
            with trio.fail_after(120):
                result = await target.wait()
    assert result.exit_code == 0, result.console
    done = int(result.output.splitlines()[-1].removeprefix("DONE "))
    assert done > migrated_at >= 3, result.output
    # QEMU negotiated the log with the source's vdev, and that vdev logged while the
    # guest ran there.
    assert "dirty logging on" in source_daemon.log_text()
    with image.open("rb") as f:
        for i in range(done):
            assert f.read(BLOCK) == block(i), f"block {i} of {done}"


WINDOW_MIB = 16
WINDOWS = 8
#: Each round reads the next window of random data from the device into the page cache
#: (vdev writes it into pages that held other data), and compares it, the next round,
#: with what the page cache holds then: on the destination, a page vdev filled after
#: the migration had sent it and did not mark in the dirty log holds old data there.
READ_SCRIPT = f"""
set -e
md5() {{  # of window $1
    dd if=/dev/vda bs=1M skip=$(($1 * {WINDOW_MIB})) count={WINDOW_MIB} 2>/dev/null | md5sum
}}
k=0
echo READY
while :; do
    if [ $k -gt 0 ] && [ "$(md5 $prev)" != "$device" ]; then
        echo "MISMATCH in the page cache, window $prev"; exit 1
    fi
    echo 3 > /proc/sys/vm/drop_caches
    stop=$(dd if=/dev/vda bs=1M skip={WINDOWS * WINDOW_MIB} count=1 2>/dev/null | head -c 4)
    prev=$((k % {WINDOWS}))
    device=$(md5 $prev)
    k=$((k + 1))
    echo "round $k"
    [ "$stop" = STOP ] && break
    [ $k -lt 1000 ] || {{ echo "never told to stop"; exit 1; }}
done
echo "DONE $k"
"""


async def test_what_vdev_reads_into_guest_memory_during_migration_reaches_the_target(
    tmp_path: Path, vdev_daemon: DaemonFactory, vdev_guest: GuestRunner, vdev_socket_dir: Path
) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        for _ in range(WINDOWS * WINDOW_MIB):
            f.write(os.urandom(MiB))
        f.truncate((WINDOWS * WINDOW_MIB + 1) * MiB)
    source_daemon = await vdev_daemon("blk", "--backend", "file", "--path", str(image))
    target_daemon = await vdev_daemon("blk", "--backend", "file", "--path", str(image))
    args = [*disk_args(source_daemon.socket), *qmp_args(vdev_socket_dir / "qmp-src.sock")]
    async with vdev_guest.start(READ_SCRIPT, qemu_args=args, kernel_args=KERNEL_ARGS) as source:
        with trio.fail_after(120):
            await source.wait_for("READY")
        await until_round(source, 2)
        async with migrated(source, vdev_socket_dir, disk_args(target_daemon.socket)) as target:
            migrated_at = rounds(target)
            await until_round(target, migrated_at + 3)
            with image.open("r+b") as f:
                f.seek(WINDOWS * WINDOW_MIB * MiB)
                f.write(b"STOP")
            with trio.fail_after(120):
                result = await target.wait()
    assert result.exit_code == 0, result.console
    assert result.output.splitlines()[-1].startswith("DONE "), result.output
