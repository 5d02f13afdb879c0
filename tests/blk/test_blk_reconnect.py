"""kill -9 of a real `vdev run` daemon, many times, in the middle of a queue-depth-32
write and read-verify workload driven by `vdev.testing.Frontend` (no guest): each time a
new daemon starts on the same socket, the front-end hands it the same guest memory, ring
and in-flight buffer as QEMU does after a reconnect, and the workload goes on.

Recovery must be exact every time: every request completes once (a second completion
of a chain the driver already got back is a protocol error of the driver ring, a lost
one never completes), every read returns what was written, and at the end the
in-flight buffer has nothing left marked in flight.
"""

from __future__ import annotations

import random
import signal
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from vdev.devices.blk import REQUEST_HEADER
from vdev.devices.blk_requests import RequestType, Status
from vdev.testing import FakeGuestMemory, Frontend, FrontendQueue, InflightFd
from vdev.testing.pytest_plugin import Daemon, DaemonFactory
from vdev.virtio.inflight import PackedInflight, SplitInflight

BLOCK = 128 << 10
BLOCKS = 256
QUEUE_SIZE = 128
DEPTH = 32
KILLS = 16
SECTORS_PER_BLOCK = BLOCK // 512


def block_data(block: int) -> bytes:
    return random.Random(block).randbytes(BLOCK)


class Workload:
    """Writes every block once, then reads each back once its write completed, with up to
    DEPTH requests in flight; counts completions per request."""

    def __init__(self) -> None:
        self.to_write = list(range(BLOCKS))
        random.Random(0).shuffle(self.to_write)
        self.to_read: list[int] = []
        self.requests: dict[int, tuple[RequestType, int]] = {}  # token: (kind, block)
        self.completed: Counter[int] = Counter()
        self.submitted = 0

    @property
    def done(self) -> bool:
        return not self.to_write and not self.to_read and len(self.completed) == self.submitted

    def submit(self, queue: FrontendQueue) -> None:
        while queue.ring.in_flight < DEPTH and (self.to_write or self.to_read):
            if self.to_read and (not self.to_write or self.submitted % 2):
                block, kind = self.to_read.pop(0), RequestType.IN
                token = queue.add([self._header(kind, block)], [BLOCK, 1])
            else:
                block, kind = self.to_write.pop(), RequestType.OUT
                token = queue.add([self._header(kind, block), block_data(block)], [1])
            self.requests[token] = (kind, block)
            self.submitted += 1
        queue.kick()

    async def collect(self, queue: FrontendQueue) -> None:
        for used in await queue.wait_used(1):
            kind, block = self.requests[used.token]
            self.completed[used.token] += 1
            assert used.last_byte == Status.OK, (kind, block)
            if kind == RequestType.OUT:
                self.to_read.append(block)
            else:
                assert used.data[0] == block_data(block), f"block {block} reads back wrong"

    @staticmethod
    def _header(kind: RequestType, block: int) -> bytes:
        return REQUEST_HEADER.pack(kind, 0, block * SECTORS_PER_BLOCK)


def tracker(
    inflight: InflightFd, packed: bool, cleanup: ExitStack
) -> SplitInflight | PackedInflight:
    """What the in-flight buffer says of queue 0, read from a mapping of our own."""
    buffer = inflight.mapped()
    cleanup.callback(buffer.close)
    return (PackedInflight if packed else SplitInflight)(buffer.region(0), QUEUE_SIZE)


async def kill_soon(
    daemon: Daemon, held: SplitInflight | PackedInflight, rng: random.Random, when_taken: bool
) -> None:
    """SIGKILL the daemon after a random delay or, with `when_taken`, as soon as the
    in-flight buffer shows it took requests (frozen with SIGSTOP at once, so that the
    kill catches some: a batch of 32 large writes and reads takes it milliseconds)."""
    if when_taken:
        with trio.move_on_after(0.2):  # it may have nothing left to take
            while not held.in_flight():
                await trio.sleep(0)
            daemon.process.send_signal(signal.SIGSTOP)
    else:
        await trio.sleep(rng.uniform(0, 0.002))
    await daemon.stop(signal.SIGKILL)


async def resubmitted_requests(daemon: Daemon) -> int:
    """How many requests the daemon's queue 0 re-submitted when it started (`vdev ctl`)."""
    (device,) = await daemon.stats()
    return device["queues"][0]["resubmitted"]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_kill_9_at_many_points_is_recovered_exactly(
    tmp_path: Path, vdev_daemon: DaemonFactory, vdev_socket_dir: Path, packed: bool
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(BLOCKS * BLOCK))
    sock = vdev_socket_dir / "blk.sock"
    args = ("blk", "--backend", "file", "--path", str(image), "--socket", str(sock))
    args += ("--poll-us", "0")  # whole batches: the worker sleeps until kicked
    rng = random.Random(1 if packed else 2)
    kill_at = sorted(rng.sample(range(DEPTH, 2 * BLOCKS - 4 * DEPTH), KILLS))
    memory = FakeGuestMemory(64 << 20, regions=2, memfd=True, user_offset=0x7F00_0000_0000)
    workload = Workload()
    daemons: list[Daemon] = []
    resubmitted: list[int] = []  # by each daemon, read from its control socket
    with ExitStack() as cleanup:
        cleanup.callback(memory.close)
        inflight: InflightFd | None = None
        while not workload.done:
            daemon = await vdev_daemon(*args)
            daemons.append(daemon)
            async with Frontend.connect(sock, memory=memory, keep_memory=True) as fe:
                if inflight is None:  # the first start, as QEMU's vhost_user_blk_start
                    features = await fe.negotiate(packed=packed)
                    inflight = await fe.get_inflight_fd(1, QUEUE_SIZE)
                    cleanup.callback(inflight.close)
                    held = tracker(inflight, packed, cleanup)
                    await fe.set_inflight_fd(inflight)
                    queue = await fe.setup_queue(0, QUEUE_SIZE)
                else:  # after a reconnect: same memory, ring and in-flight buffer
                    await fe.negotiate(features, inflight=inflight)
                    queue = await fe.resume_queue(0, queue.ring)
                resubmitted.append(await resubmitted_requests(daemon))
                while not workload.done:
                    workload.submit(queue)
                    if kill_at and workload.submitted >= kill_at[0]:
                        kill_at.pop(0)
                        when_taken = len(kill_at) % 2 == 0
                        if when_taken:  # a whole batch for it to take
                            while queue.ring.in_flight:
                                await workload.collect(queue)
                            workload.submit(queue)
                        await kill_soon(daemon, held, rng, when_taken)
                        break
                    await workload.collect(queue)
        assert held.in_flight() == []
    assert len(daemons) == KILLS + 1
    assert sorted(workload.completed.values()) == [1] * 2 * BLOCKS  # none lost, none twice
    assert image.read_bytes() == b"".join(block_data(b) for b in range(BLOCKS))
    print(f"{'packed' if packed else 'split'}: re-submitted after each kill {resubmitted[1:]}")
    assert resubmitted[0] == 0
    assert sum(n > 0 for n in resubmitted) >= 2  # kills caught requests it had taken
