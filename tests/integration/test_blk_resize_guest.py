"""Live resize seen by a real Linux guest under QEMU: `DeviceServer.resize` while the
guest runs, CONFIG_CHANGE_MSG on the back-end channel, QEMU re-reads the config and
interrupts the guest, whose /sys/block/vda/size changes without a reboot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio
from vdev_backends.blk_file import FileBackend

from vdev import qemu
from vdev.devices.blk import BlkDevice
from vdev.qemu import render_args
from vdev.testing.frontend import running_server
from vdev.testing.guest import start_guest

needs_qemu = pytest.mark.skipif(
    shutil.which(qemu.QEMU_BINARY) is None,
    reason=f"{qemu.QEMU_BINARY} not installed (Debian package {qemu.QEMU_PACKAGE})",
)

MiB = 1 << 20
SECTOR = 512
OLD, NEW = 16 * MiB, 48 * MiB
MARK = b"written-past-the-old-end"

#: Waits (up to a minute) for the size to change, then writes a sector at the new end.
SCRIPT = f"""
set -e
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


@needs_qemu
async def test_guest_sees_a_live_resize(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(OLD)
    device = BlkDevice(FileBackend(image))
    sock = tmp_path / "blk.sock"
    args = render_args("vdev-blk", id="disk0", socket=sock, queues=1)
    try:
        async with (
            running_server(device, sock) as server,
            start_guest(SCRIPT, qemu_args=args) as guest,
        ):
            with trio.fail_after(120):
                await guest.wait_for("READY-FOR-RESIZE")
            assert await server.resize(NEW), "the front-end did not acknowledge"
            with trio.fail_after(120):
                result = await guest.wait()
    finally:
        device.close()
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
