"""A real Linux guest writes and verifies data on a disk whose backend runs in a driver
domain, while the test kills that domain's child: the guest sees no I/O error."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import trio
from domain_helpers import blk_in_domain, host_of, kill_child, wait_until

from vdev.qemu import render_args
from vdev.server import DeviceServer
from vdev.testing.pytest_plugin import GuestRunner

MiB = 1 << 20
ROUNDS = 6
KILL_AT = (2, 3, 5)
CHUNK = 4 * MiB

SCRIPT = f"""
dd if=/dev/urandom of=/tmp/src bs=1M count={CHUNK // MiB} 2>/dev/null
for round in $(seq 1 {ROUNDS}); do
    echo "round $round"
    dd if=/tmp/src of=/dev/vda bs=1M seek=$((round * {CHUNK // MiB})) oflag=direct \\
        conv=notrunc,fsync 2>/dev/null || echo "write failed $round"
    dd if=/dev/vda bs=1M count={CHUNK // MiB} skip=$((round * {CHUNK // MiB})) iflag=direct \\
        2>/dev/null | cmp - /tmp/src && echo "verified $round"
done
sha256sum /tmp/src
echo "io errors: $(dmesg | grep -ci 'error')"
"""


@pytest.mark.parametrize("memory", ["map", "copy"])
async def test_guest_io_survives_killed_domain(
    tmp_path: Path, memory: str, vdev_guest: GuestRunner
) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    sock = tmp_path / "guest.sock"
    device = blk_in_domain(sock, "file", {"path": str(image)}, memory=memory)
    host = host_of(device)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(DeviceServer(device, sock).serve)
            args = render_args("vdev-blk", id="disk0", socket=sock, queues=1)
            async with vdev_guest.start(SCRIPT, qemu_args=args, mem="256M") as guest:
                with trio.fail_after(240):
                    for n, round_ in enumerate(KILL_AT):
                        await guest.wait_for(f"round {round_}\n")
                        await wait_until(lambda n=n: host.restarts == n and host.pid)
                        kill_child(host)
                    result = await guest.wait()
            nursery.cancel_scope.cancel()
    finally:
        device.close()
    output = result.output
    assert result.exit_code == 0, output
    assert [f"verified {r}" in output for r in range(1, ROUNDS + 1)] == [True] * ROUNDS, output
    assert "write failed" not in output and "io errors: 0" in output, output
    digest = re.search(r"^([0-9a-f]{64})\s", output, re.MULTILINE)
    assert digest is not None, output
    data = image.read_bytes()
    for round_ in range(1, ROUNDS + 1):
        chunk = data[round_ * CHUNK : (round_ + 1) * CHUNK]
        assert hashlib.sha256(chunk).hexdigest() == digest.group(1), f"round {round_}"
    assert host.restarts == host.crashes == len(KILL_AT) and host.failure is None
