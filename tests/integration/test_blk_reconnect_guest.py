"""kill -9 of the vdev daemon under a real Linux guest running fio, and a restart on the
same socket: QEMU reconnects (or the restarted daemon connects to QEMU), the daemon
re-submits the requests the dead one had taken (INFLIGHT_SHMFD), and fio finishes with
no I/O error and every block it wrote, before and after the kill, verified.

Both socket directions (vdev listens and QEMU has ``reconnect=1``: the shipped
vdev-blk-reconnect template; QEMU listens and ``vdev run --client`` connects:
vdev-blk-server), split and packed rings. The kill lands while the daemon holds requests:
the test watches the daemon's in-flight buffer (its memfd, through /proc) and freezes
the daemon with SIGSTOP the moment it shows requests taken, then kills it. The gap from
the kill to the first write that reaches the image after the restart is printed. The
restarted daemon traces its session (``--trace``), to check how QEMU 7.2 stops it at
power-off: SET_STATUS 0, then GET_VRING_BASE, whose answer must survive the first.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import trio

from vdev.qemu import render_args
from vdev.testing.pytest_plugin import Daemon, DaemonFactory, GuestRunner
from vdev.virtio.inflight import InflightBuffer, PackedInflight, SplitInflight

MiB = 1 << 20
JOBS = 2
JOB_SIZE = 60 * MiB
#: QEMU's vhost-user-blk default queue-size.
QUEUE_SIZE = 128
#: How long fio writes before the host starts looking for a moment to kill (its writes
#: take several seconds more: JOB_SIZE is large enough for that under TCG).
WRITING = 1.0

#: Random 4 KiB writes at queue depth 32 from two jobs (each on its own half of the
#: disk), then fio reads every block back and checks its crc32c header.
SCRIPT = f"""
echo FIO-START
fio --eta=never --output-format=json --output=/tmp/fio.json \\
    --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 --numjobs={JOBS} \\
    --name=verify --rw=randwrite --bs=4k --size={JOB_SIZE // MiB}M \\
    --offset_increment={JOB_SIZE // MiB}M --verify=crc32c --verify_fatal=1
status=$?
cat /tmp/fio.json
exit $status
"""


def inflight_tracker(
    pid: int, packed: bool
) -> tuple[InflightBuffer, SplitInflight | PackedInflight]:
    """A mapping of the in-flight buffer of `pid` (its vdev-inflight memfd) and what it
    says of queue 0."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("/memfd:vdev-inflight"):
            fd = os.open(entry, os.O_RDWR)
            buffer = InflightBuffer(fd, os.fstat(fd).st_size, 0, 1, QUEUE_SIZE)
            tracker = PackedInflight if packed else SplitInflight
            return buffer, tracker(buffer.region(0), QUEUE_SIZE)
    raise AssertionError(f"vdev run (pid {pid}) holds no in-flight buffer")


async def kill_holding_requests(daemon: Daemon, held: SplitInflight | PackedInflight) -> int:
    """SIGKILL the daemon at a moment it holds requests; how many it held."""
    with trio.fail_after(60):
        while True:
            await trio.sleep(0.001)
            if not held.in_flight():
                continue
            daemon.process.send_signal(signal.SIGSTOP)
            await trio.sleep(0.01)  # stopped for sure
            taken = len(held.in_flight())
            if taken:
                await daemon.stop(signal.SIGKILL)
                return taken
            daemon.process.send_signal(signal.SIGCONT)  # it completed them meanwhile


def final_bases(trace: str) -> list[int]:
    """The bases the daemon reported (GET_VRING_BASE replies) after the last SET_STATUS 0,
    from its ``--trace`` log."""
    after_reset = trace.rpartition("SET_STATUS status=0x0")[2]
    return [int(n) for n in re.findall(r"GET_VRING_BASE \[REPLY\] index=0 base=(\d+)", after_reset)]


async def first_write_after(image: Path, since_ns: int) -> float:
    """Seconds from `since_ns` (wall clock) until the image is written again."""
    with trio.move_on_after(60):
        while (mtime := image.stat().st_mtime_ns) <= since_ns:
            await trio.sleep(0.005)
        return (mtime - since_ns) / 1e9
    raise AssertionError("no write reached the image in 60 s after the kill (or fio was done)")


@pytest.mark.requires_qemu
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("qemu_listens", [False, True], ids=["vdev-listens", "qemu-listens"])
async def test_kill_9_under_fio_loses_nothing(
    tmp_path: Path,
    vdev_daemon: DaemonFactory,
    vdev_socket_dir: Path,
    vdev_guest: GuestRunner,
    packed: bool,
    qemu_listens: bool,
) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(JOBS * JOB_SIZE)
    sock = vdev_socket_dir / "blk.sock"
    args = ["blk", "--backend", "file", "--path", str(image), "--socket", str(sock)]
    template = "vdev-blk-server" if qemu_listens else "vdev-blk-reconnect"
    if qemu_listens:
        args.append("--client")
    qemu_args = render_args(template, id="disk0", socket=sock, queues=1, packed=packed)

    first = await vdev_daemon(*args)
    async with vdev_guest.start(SCRIPT, qemu_args=qemu_args, extra_binaries=["fio"]) as guest:
        with trio.fail_after(120):
            await guest.wait_for("FIO-START")
        await trio.sleep(WRITING)
        buffer, held = inflight_tracker(first.process.pid, packed)
        try:
            taken = await kill_holding_requests(first, held)
            killed_ns = time.time_ns()
            successor = await vdev_daemon(*args, "--trace")  # what a supervisor does
            gap = await first_write_after(image, killed_ns)
            (device,) = await successor.stats()  # vdev ctl stats, while QEMU is connected
            with trio.fail_after(300):
                result = await guest.wait()
            left = held.in_flight()
        finally:
            buffer.close()

    assert result.exit_code == 0, result.console
    assert "I/O error" not in result.console
    jobs = json.loads(result.output[result.output.index("{") :])["jobs"]
    assert len(jobs) == JOBS
    for job in jobs:
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == JOB_SIZE
        assert job["read"]["io_bytes"] == JOB_SIZE  # the verify pass read it all back
    resubmitted = device["queues"][0]["resubmitted"]
    assert 0 < resubmitted <= taken
    assert left == []
    # At power-off QEMU 7.2 stops the device with SET_STATUS 0 and only then asks for
    # the queue's base: it must still be where the queue stopped (after some 61440
    # requests: not 0, which a reset queue reports).
    bases = final_bases(successor.log_text())
    assert len(bases) == 1 and bases[0] != 0, bases
    direction = "QEMU listens" if qemu_listens else "vdev listens"
    print(
        f"{direction}, {'packed' if packed else 'split'}: killed holding {taken} requests, "
        f"{resubmitted} re-submitted, first write {gap:.2f} s after the kill"
    )
