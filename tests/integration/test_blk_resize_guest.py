"""Live resize seen by a real Linux guest under QEMU, through `vdev ctl` against a
`vdev run` daemon: CONFIG_CHANGE_MSG on the back-end channel, QEMU re-reads the config
and interrupts the guest, whose /sys/block/vda/size changes without a reboot. The
statistics the control socket shows meanwhile are what QEMU negotiated and sent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from vdev.qemu import render_args

VDEV = [sys.executable, "-m", "vdev.cli"]
MiB = 1 << 20
SECTOR = 512
OLD, NEW = 16 * MiB, 48 * MiB
MARK = b"written-past-the-old-end"

#: Reads the disk, waits (up to a minute) for its size to change, then writes a sector
#: at the new end.
SCRIPT = f"""
set -e
dd if=/dev/vda of=/dev/null bs=4096 count=64 2>/dev/null
old=$(cat /sys/block/vda/size)
echo "size $old"
echo READY-FOR-RESIZE
i=0
while [ "$(cat /sys/block/vda/size)" = "$old" ]; do
    i=$((i + 1))
    if [ $i -gt 600 ]; then echo "size never changed"; exit 1; fi
    usleep 100000
done
new=$(cat /sys/block/vda/size)
echo "size $new"
echo -n {MARK.decode()} | dd of=/dev/vda bs={SECTOR} seek=$((new - 1)) conv=sync,fsync 2>/dev/null
echo "write rc=$?"
"""


async def vdev_ctl(*args: str) -> str:
    result = await trio.run_process(
        [*VDEV, "ctl", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


@pytest.mark.requires_qemu
async def test_vdev_ctl_resizes_a_running_guests_disk(
    tmp_path: Path, vdev_daemon, vdev_guest
) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(OLD)
    daemon = await vdev_daemon("blk", "--backend", "file", "--path", str(image))
    sock = str(daemon.socket)
    args = render_args("vdev-blk", id="disk0", socket=daemon.socket, queues=1)
    async with vdev_guest.start(SCRIPT, qemu_args=args) as guest:
        with trio.fail_after(120):
            await guest.wait_for("READY-FOR-RESIZE")
        [disk] = await daemon.stats()
        assert disk["connected"] and "DRIVER_OK" in disk["status"]["names"]
        assert {"VERSION_1", "FLUSH"} <= set(disk["features"]["names"])
        assert "BACKEND_REQ" in disk["protocol_features"]["names"]
        # The guest's 256 KiB read, at least, and nothing failed.
        assert disk["counters"]["bytes_read"] >= 64 * 4096
        assert disk["counters"]["errors"] == 0
        assert disk["counters"]["requests"] == sum(q["requests"] for q in disk["queues"])

        told = await vdev_ctl("--socket", sock, "resize", daemon.socket.stem, "48M")
        assert told.strip().endswith(f"resized to {NEW} bytes; the front-end was told")
        with trio.fail_after(120):
            result = await guest.wait()
    assert result.exit_code == 0, result.console
    assert result.output.splitlines() == [
        f"size {OLD // SECTOR}",
        "READY-FOR-RESIZE",
        f"size {NEW // SECTOR}",
        "write rc=0",
    ]
    assert image.stat().st_size == NEW
    with image.open("rb") as f:
        f.seek(NEW - SECTOR)
        assert f.read(SECTOR) == MARK.ljust(SECTOR, b"\0")
