"""Queue worker threads: started and stopped with the session, completing what is in
flight, leaking nothing over many sessions."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import trio
from vdev_backends.blk_ram import RamBackend

from vdev.devices.blk import REQUEST_HEADER, BlkDevice, RequestType, Status
from vdev.testing.frontend import Frontend, serve_device

SECTOR = 512
CYCLES = 1000


def header(kind: int, sector: int = 0) -> bytes:
    return REQUEST_HEADER.pack(kind, 0, sector)


def vdev_threads() -> int:
    """Threads of vdev's own (trio's thread cache comes and goes by itself)."""
    return sum(t.name.startswith("vdev-") for t in threading.enumerate())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum("memfd:" in line for line in maps)


async def test_reconnect_storm_leaks_no_thread_fd_or_mapping(tmp_path: Path) -> None:
    device = BlkDevice(RamBackend(1 << 20))
    counts = []
    async with serve_device(device, tmp_path / "s.sock") as path:
        for cycle in range(CYCLES):
            async with Frontend.connect(path) as fe:
                await fe.negotiate(packed=bool(cycle % 2))
                q = await fe.setup_queue(0, size=16)
                data = bytes([cycle % 256]) * SECTOR
                with trio.fail_after(10):
                    write = await q.transact([header(RequestType.OUT, cycle % 64), data], [1])
                    read = await q.transact([header(RequestType.IN, cycle % 64)], [SECTOR, 1])
                assert (write.last_byte, read.last_byte) == (Status.OK, Status.OK)
                assert read.data[0] == data
            if cycle in (50, CYCLES - 1):
                with trio.fail_after(10):  # let the server finish the session
                    while any(t.name.startswith("vdev-q") for t in threading.enumerate()):
                        await trio.sleep(0.01)
                gc.collect()  # what earlier tests left may go meanwhile: count growth only
                counts.append((vdev_threads(), open_fds(), memfd_mappings()))
    first, last = counts
    grown = [b > a for a, b in zip(first, last, strict=True)]
    assert not any(grown), f"threads, fds, memfd mappings: {first} after 50 sessions, {last} after"
    assert device.stats()["requests"] == 2 * CYCLES
    device.close()


class GatedDisk(RamBackend):
    """A RAM disk whose reads wait for the test to open the gate."""

    def __init__(self) -> None:
        super().__init__(1 << 20)
        self.started = threading.Event()
        self.gate = threading.Event()

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.started.set()
        if not self.gate.wait(10):
            raise OSError(110, "gate never opened")
        super().read(offset, buffers)


async def test_a_stop_mid_batch_completes_every_request_exactly_once(tmp_path: Path) -> None:
    backend = GatedDisk()
    device = BlkDevice(backend)
    async with serve_device(device, tmp_path / "s.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        q = await fe.setup_queue(0, size=32)
        tokens = [q.add([header(RequestType.IN, i)], [SECTOR, 1]) for i in range(8)]
        q.kick()
        with trio.fail_after(10):
            await trio.to_thread.run_sync(backend.started.wait)
        async with trio.open_nursery() as nursery:
            # GET_VRING_BASE while the batch is in the backend: it waits for the batch.
            nursery.start_soon(trio.sleep, 0.2)
            base_result: list[int] = []

            async def stop() -> None:
                base_result.append(await fe.stop_queue(0))

            nursery.start_soon(stop)
            await trio.sleep(0.1)
            assert not base_result  # still waiting for the requests in flight
            backend.gate.set()
        used = q.ring.get_used()
    assert sorted(u.token for u in used) == sorted(tokens)  # each exactly once
    assert all(u.last_byte == Status.OK for u in used)
    assert base_result == [8]
    assert device.stats()["requests"] == 8
    device.close()


async def test_queues_share_one_worker_thread_unless_asked_for_more(tmp_path: Path) -> None:
    for threads in (1, 2):
        device = BlkDevice(RamBackend(1 << 20), queues=2)
        device.queue_threads = threads
        sock = tmp_path / f"t{threads}.sock"
        async with serve_device(device, sock) as path, Frontend.connect(path) as fe:
            await fe.negotiate()
            queues = [await fe.setup_queue(i, size=16) for i in (0, 1)]
            with trio.fail_after(10):
                for q in queues:
                    used = await q.transact([header(RequestType.IN, 0)], [SECTOR, 1])
                    assert used.last_byte == Status.OK
            workers = {t.name for t in threading.enumerate() if t.name.startswith("vdev-q")}
            assert len(workers) == threads
        stats = device.stats()
        assert (stats["queue0_requests"], stats["queue1_requests"]) == (1, 1)
        device.close()
