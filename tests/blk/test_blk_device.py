"""BlkDevice semantics, driven directly through `handle` with prepared chains."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import trio
from blk_helpers import (
    SECTOR,
    ListQueue,
    Req,
    header,
    le32,
    make,
    read_req,
    segments,
    simple_req,
    write_req,
)
from vdev_backends.blk_file import FileBackend
from vdev_backends.blk_null import NullBackend
from vdev_backends.blk_ram import RamBackend

from vdev.backend import BackendError, BlockBackend
from vdev.devices.base import DeviceError
from vdev.devices.blk import (
    CONFIG,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEGMENTS,
    BlkDevice,
    BlkFeature,
    RequestType,
    Status,
)
from vdev.devices.blk_requests import BlkRequest, InlineExecutor
from vdev.plugins import Kind, load

MiB = 1 << 20
SIZE = 4 * MiB
CAPACITY = SIZE // SECTOR
OK, IOERR, UNSUPP = Status.OK, Status.IOERR, Status.UNSUPP
NEGOTIATED = BlkFeature.FLUSH | BlkFeature.CONFIG_WCE | BlkFeature.DISCARD


class Recording(RamBackend):
    """A RAM disk that records its calls and the threads they ran in."""

    def __init__(self, size: int = SIZE, **kwargs: object) -> None:
        super().__init__(size, **kwargs)  # type: ignore[arg-type]
        self.calls: list[tuple[str, int]] = []
        self.threads: set[int] = set()
        self.fail: type[BaseException] | None = None

    def _record(self, name: str, offset: int = 0) -> None:
        self.calls.append((name, offset))
        self.threads.add(threading.get_ident())
        if self.fail is not None:
            raise self.fail("simulated failure")

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._record("read", offset)
        super().read(offset, buffers)

    def write(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._record("write", offset)
        super().write(offset, buffers)

    def flush(self) -> None:
        self._record("flush")

    def discard(self, offset: int, length: int) -> None:
        self._record("discard", offset)
        super().discard(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._record("write_zeroes", offset)
        super().write_zeroes(offset, length, unmap)


class ReadOnly(RamBackend):
    read_only = True


class Plain(BlockBackend):
    """Only the required methods: no discard, no write zeroes."""

    size = SIZE

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        for b in buffers:
            b[:] = bytes(b.nbytes)

    def write(self, offset: int, buffers: Sequence[memoryview]) -> None:
        pass


def device_for(backend: BlockBackend, features: int = NEGOTIATED, **kwargs: int) -> BlkDevice:
    dev = BlkDevice(backend, **kwargs)  # type: ignore[arg-type]
    dev.set_features(features & (dev.features() | BlkFeature.FLUSH | BlkFeature.CONFIG_WCE))
    return dev


async def run(dev: BlkDevice, *reqs: Req, index: int = 0) -> ListQueue:
    q = ListQueue(index)
    q.add(*reqs)
    dev.start_queue(q)
    while q.pending:
        dev.handle(q)
    return q


@pytest.fixture
def rec() -> Iterator[Recording]:
    backend = Recording()
    yield backend
    backend.close()


@pytest.fixture
def dev(rec: Recording) -> BlkDevice:
    return device_for(rec)


@pytest.fixture(params=["file", "ram", "null"])
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockBackend]:
    if request.param == "file":
        path = tmp_path / "disk.img"
        with path.open("wb") as f:
            f.truncate(SIZE)
        backend: BlockBackend = FileBackend(path, serial="file-serial")
    elif request.param == "ram":
        backend = RamBackend(SIZE, serial="ram-serial")
    else:
        backend = NullBackend(SIZE, serial="null-serial")
    yield backend
    backend.close()


# --- features and configuration space ------------------------------------------------


def test_is_the_registered_blk_device() -> None:
    assert load(Kind.DEVICE, "blk") is BlkDevice
    assert BlkDevice.device_id == 2


def test_features(tmp_path: Path) -> None:
    ram = RamBackend(SIZE)
    base = BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH | BlkFeature.CONFIG_WCE
    assert BlkDevice(ram).features() == base | BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES
    assert BlkDevice(ram, queues=2).features() & BlkFeature.MQ
    assert BlkDevice(ReadOnly(SIZE)).features() == base | BlkFeature.RO
    assert BlkDevice(Plain()).features() == base
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(SIZE))
    disk = FileBackend(path)
    assert BlkDevice(disk).features() & BlkFeature.TOPOLOGY  # 512-byte sectors on 4K fs
    disk.close()
    for f in BlkDevice(ram).features(), BlkDevice(disk).features():
        assert not f & (BlkFeature.SIZE_MAX | BlkFeature.GEOMETRY | (1 << 32))


def test_config_layout() -> None:
    dev = BlkDevice(RamBackend(SIZE), queues=3, max_queue_size=256)
    config = dev.config()
    assert len(config) == 60
    (capacity, size_max, seg_max, cyl, heads, sectors, blk_size, pexp, align, min_io, opt_io,
     writeback, unused0, num_queues, max_discard, discard_seg, discard_align, max_wz, wz_seg,
     may_unmap) = CONFIG.unpack(config)  # fmt: skip
    assert capacity == CAPACITY
    assert (size_max, cyl, heads, sectors, unused0) == (0, 0, 0, 0, 0)
    assert seg_max == 126
    assert blk_size == 512
    assert (pexp, align, min_io, opt_io) == (0, 0, 0, 0)
    assert writeback == 1 and config[32] == 1
    assert num_queues == 3 and config[34:36] == b"\x03\x00"
    assert (max_discard, discard_seg, discard_align) == (
        MAX_DISCARD_SECTORS,
        MAX_DISCARD_SEGMENTS,
        1,
    )
    assert (max_wz, wz_seg, may_unmap) == (MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, 1)
    assert config[57:60] == bytes(3)
    assert CONFIG.unpack(BlkDevice(RamBackend(SIZE), max_queue_size=64).config())[2] == 62


def test_config_topology(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(SIZE))
    disk = FileBackend(path)
    try:
        blksize = os.stat(path).st_blksize
        config = BlkDevice(disk).config()
        assert config[24] == (blksize // 512).bit_length() - 1  # physical_block_exp
        assert int.from_bytes(config[26:28], "little") == blksize // 512  # min_io_size
    finally:
        disk.close()


def test_writeback_is_settable_with_config_wce(rec: Recording) -> None:
    dev = BlkDevice(rec)
    with pytest.raises(DeviceError):  # CONFIG_WCE not negotiated yet
        dev.write_config(32, b"\x00")
    dev.set_features(BlkFeature.FLUSH | BlkFeature.CONFIG_WCE)
    assert not dev.writethrough
    dev.write_config(32, b"\x00")
    assert dev.config()[32] == 0 and dev.writethrough
    dev.write_config(32, b"\x01")
    assert dev.config()[32] == 1 and not dev.writethrough
    for offset, data in [(0, b"\x00" * 8), (32, b"\x02"), (33, b"\x00"), (32, b"\x00\x00")]:
        with pytest.raises(DeviceError):
            dev.write_config(offset, data)


def test_cache_mode_follows_negotiation(rec: Recording) -> None:
    dev = BlkDevice(rec)
    dev.set_features(0)
    assert dev.writethrough  # neither FLUSH nor CONFIG_WCE: writes must be stable
    dev.set_features(BlkFeature.FLUSH)
    assert not dev.writethrough
    dev.set_features(BlkFeature.CONFIG_WCE)  # CONFIG_WCE without FLUSH: writeback = 0
    assert dev.config()[32] == 0 and dev.writethrough
    dev.reset()
    assert dev.config()[32] == 1 and dev.acked_features == 0


def test_serial(rec: Recording) -> None:
    assert BlkDevice(RamBackend(SIZE, serial="from-backend")).serial == b"from-backend"
    assert BlkDevice(RamBackend(SIZE, serial="b"), serial="from-device").serial == b"from-device"
    with pytest.raises(ValueError, match=r"^serial: .* longer than 20"):
        BlkDevice(rec, serial="x" * 21)
    with pytest.raises(ValueError, match=r"^serial: .* not ASCII"):
        BlkDevice(rec, serial="d\u00efsk")
    with pytest.raises(ValueError, match=r"^queues: 0 is not between"):
        BlkDevice(rec, queues=0)
    with pytest.raises(ValueError, match=r"^max_queue_size: invalid number 'lots'"):
        BlkDevice(rec, max_queue_size="lots")
    dev = BlkDevice(rec, queues="4", max_queue_size="256")  # as given by -o KEY=VALUE
    assert (dev.num_queues, dev.max_queue_size) == (4, 256)


# --- every request type on every backend ---------------------------------------------


async def test_every_request_type(any_backend: BlockBackend) -> None:
    dev = device_for(any_backend)
    null = isinstance(any_backend, NullBackend)
    data = os.urandom(8 * SECTOR)
    write = write_req(100, data)
    read = read_req(100, 8 * SECTOR)
    flush = simple_req(RequestType.FLUSH)
    get_id = simple_req(RequestType.GET_ID, writable=[20, 1])
    q = await run(dev, write, flush, read, get_id)
    assert [r.status for r in (write, flush, read, get_id)] == [OK] * 4
    assert read.data_in == (bytes(len(data)) if null else data)
    serial = any_backend.serial.encode()
    assert get_id.data_in == serial + bytes(20 - len(serial))
    assert [w for _, w in q.used] == [1, 1, 8 * SECTOR + 1, 21]
    assert q.notifies == 1

    discard = simple_req(RequestType.DISCARD, segments((100, 2, 0)))
    zeroes = simple_req(RequestType.WRITE_ZEROES, segments((102, 2, 0), (104, 4, 1)))
    read_back = read_req(100, 8 * SECTOR)
    await run(dev, discard, zeroes, read_back)
    assert [r.status for r in (discard, zeroes, read_back)] == [OK] * 3
    # Discarded sectors may read as anything; written-zeroes ones must read zeros.
    assert read_back.data_in[2 * SECTOR :] == bytes(6 * SECTOR)

    stats = dev.stats()
    assert stats["requests"] == 7 and stats["queue0_requests"] == 7
    assert (stats["in_requests"], stats["out_requests"], stats["flush_requests"]) == (2, 1, 1)
    assert (stats["get_id_requests"], stats["discard_requests"]) == (1, 1)
    assert stats["write_zeroes_requests"] == 1
    assert stats["bytes_read"] == 16 * SECTOR and stats["bytes_written"] == 8 * SECTOR
    assert stats["errors"] == 0


async def test_header_and_data_share_descriptors(rec: Recording) -> None:
    dev = device_for(rec)
    data = os.urandom(2 * SECTOR)
    write = make([header(RequestType.OUT, 7) + data[:100], data[100:]], [1])
    # IN: the data and the status byte in one writable buffer, header split in two.
    raw = header(RequestType.IN, 7)
    read = make([raw[:5], raw[5:]], [2 * SECTOR + 1])
    q = await run(dev, write, read)
    assert (write.status, read.status) == (OK, OK)
    assert read.data_in == data
    assert q.written(read) == 2 * SECTOR + 1
    # The payload reached the backend as views of the guest buffers, not copies.
    assert rec.calls == [("write", 7 * SECTOR), ("read", 7 * SECTOR)]


async def test_get_id_larger_buffer(rec: Recording) -> None:
    dev = device_for(rec)
    dev.serial = b"x" * 20
    req = simple_req(RequestType.GET_ID, writable=[7, 30, 1])
    q = await run(dev, req)
    assert req.status == OK and q.written(req) == 38
    assert req.data_in == b"x" * 20 + bytes(17)  # NUL-padded over the whole buffer


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_req", "status"),
    [
        (lambda: read_req(CAPACITY - 1, 2 * SECTOR), IOERR),  # runs past the end
        (lambda: read_req(CAPACITY, SECTOR), IOERR),
        (lambda: read_req(2**63, SECTOR), IOERR),
        (lambda: write_req(CAPACITY - 1, bytes(2 * SECTOR)), IOERR),
        (lambda: read_req(0, 100), IOERR),  # not whole sectors
        (lambda: write_req(0, bytes(SECTOR + 1)), IOERR),
        (lambda: make([header(RequestType.IN)[:15]], [SECTOR, 1]), IOERR),  # short header
        (lambda: make([], [SECTOR, 1]), IOERR),  # no header at all
        (lambda: simple_req(RequestType.GET_ID, writable=[19, 1]), IOERR),
        (lambda: simple_req(RequestType.GET_ID), IOERR),
        (lambda: simple_req(99), UNSUPP),
        (lambda: simple_req(RequestType.GET_LIFETIME, writable=[8, 1]), UNSUPP),
        (lambda: simple_req(RequestType.SECURE_ERASE, segments((0, 1, 0))), UNSUPP),
        (lambda: simple_req(RequestType.DISCARD, segments((0, 1, 1))), UNSUPP),  # unmap
        (lambda: simple_req(RequestType.DISCARD, segments((0, 1, 4))), UNSUPP),
        (lambda: simple_req(RequestType.WRITE_ZEROES, segments((0, 1, 2))), UNSUPP),
        (lambda: simple_req(RequestType.DISCARD), IOERR),  # no segment
        (lambda: simple_req(RequestType.DISCARD, segments((0, 1, 0))[:-1]), IOERR),
        (lambda: simple_req(RequestType.DISCARD, segments((CAPACITY, 1, 0))), IOERR),
        (lambda: simple_req(RequestType.WRITE_ZEROES, segments((1, CAPACITY, 0))), IOERR),
        (lambda: simple_req(RequestType.DISCARD, segments((0, MAX_DISCARD_SECTORS + 1, 0))),
         IOERR),
        (lambda: simple_req(RequestType.DISCARD, segments(*[(0, 1, 0)] * 33)), IOERR),
    ],
)  # fmt: skip
async def test_error_status(rec: Recording, make_req: Callable[[], Req], status: Status) -> None:
    dev = device_for(rec)
    req = make_req()
    ok = read_req(0, SECTOR)
    q = await run(dev, req, ok)
    assert req.status == status
    # The used length reaches the status byte, the last writable one (a dirty log
    # marks the first used-length bytes of the writable buffers).
    assert q.written(req) == req.chain.writable_len
    assert q.written(ok) == SECTOR + 1  # data and status
    assert ok.status == OK  # the queue goes on
    assert rec.calls == [("read", 0)]  # the bad request never reached the backend
    assert dev.stats()["errors"] == 1
    assert dev.stats()["unsupported"] == (status == UNSUPP)


async def test_writes_to_a_read_only_disk_fail() -> None:
    backend = ReadOnly(SIZE)
    backend.write(0, [memoryview(b"\x07" * SECTOR)])
    dev = device_for(backend)
    reqs = [
        write_req(0, bytes(SECTOR)),
        simple_req(RequestType.DISCARD, segments((0, 1, 0))),
        simple_req(RequestType.WRITE_ZEROES, segments((0, 1, 0))),
    ]
    read = read_req(0, SECTOR)
    await run(dev, *reqs, read)
    assert [r.status for r in reqs] == [IOERR] * 3
    assert read.status == OK and read.data_in == b"\x07" * SECTOR


async def test_discard_unsupported_by_backend() -> None:
    dev = device_for(Plain())
    reqs = [simple_req(t, segments((0, 1, 0))) for t in (11, 13)]
    await run(dev, *reqs)
    assert [r.status for r in reqs] == [UNSUPP, UNSUPP]


async def test_no_status_byte(rec: Recording) -> None:
    dev = device_for(rec)
    no_status = make([header(RequestType.OUT), bytes(SECTOR)], [])
    ok = write_req(1, b"\x01" * SECTOR)
    q = await run(dev, no_status, ok)
    assert q.written(no_status) == 0
    assert ok.status == OK
    assert rec.calls == [("write", SECTOR)]  # the unanswerable request was not executed
    assert dev.stats()["errors"] == 1


@pytest.mark.parametrize("error", [OSError, RuntimeError])
async def test_backend_failure_is_an_io_error(rec: Recording, error: type[Exception]) -> None:
    dev = device_for(rec)
    rec.fail = error
    reqs = [read_req(0, SECTOR), write_req(0, bytes(SECTOR)), simple_req(RequestType.FLUSH)]
    await run(dev, *reqs)
    assert [r.status for r in reqs] == [IOERR] * 3
    rec.fail = None
    ok = read_req(0, SECTOR)
    await run(dev, ok)
    assert ok.status == OK
    assert dev.stats()["errors"] == 3


# --- batching, threads, cache mode ---------------------------------------------------


class CountingExecutor(InlineExecutor):
    """The inline executor, recording the batches it is given."""

    def __init__(self, backend: BlockBackend) -> None:
        super().__init__(backend)
        self.batches: list[list[int]] = []

    def run(self, requests: Sequence[BlkRequest]) -> None:
        self.batches.append([r.type for r in requests])
        super().run(requests)


async def test_batch_is_one_executor_run_and_one_notify(rec: Recording) -> None:
    dev = BlkDevice(rec, queues=4)
    dev.set_features(BlkFeature.FLUSH)
    executors: dict[int, CountingExecutor] = {}
    dev.executor_factory = lambda index: executors.setdefault(index, CountingExecutor(rec))
    reqs = [write_req(i, bytes([i]) * SECTOR) for i in range(5)] + [read_req(0, 5 * SECTOR)]
    q = await run(dev, *reqs, index=3)
    assert list(executors) == [3]
    assert executors[3].batches == [[RequestType.OUT] * 5 + [RequestType.IN]]
    assert q.notifies == 1
    assert reqs[-1].data_in == b"".join(bytes([i]) * SECTOR for i in range(5))


async def test_serial_backend_runs_inline_on_the_queue_thread(rec: Recording) -> None:
    dev = BlkDevice(rec)
    await run(dev, read_req(0, SECTOR))
    assert rec.threads == {threading.get_ident()}


async def test_invalid_only_batch_needs_no_executor(rec: Recording) -> None:
    dev = BlkDevice(rec)

    class Forbidden(InlineExecutor):
        def run(self, requests: Sequence[BlkRequest]) -> None:
            raise AssertionError("no backend work expected")

    dev.executor_factory = lambda index: Forbidden(rec)
    req = simple_req(99)
    q = await run(dev, req)
    assert req.status == UNSUPP and q.notifies == 1


@pytest.mark.parametrize(
    ("features", "writeback", "flushes"),
    [
        (BlkFeature.FLUSH, None, 0),
        (0, None, 1),  # neither FLUSH nor CONFIG_WCE: write-through
        (BlkFeature.FLUSH | BlkFeature.CONFIG_WCE, b"\x00", 1),
        (BlkFeature.FLUSH | BlkFeature.CONFIG_WCE, b"\x01", 0),
    ],
)
async def test_writethrough_flushes_once_per_batch(
    rec: Recording, features: int, writeback: bytes | None, flushes: int
) -> None:
    dev = device_for(rec, features)
    if writeback is not None:
        dev.write_config(32, writeback)
    reqs = [write_req(i, bytes(SECTOR)) for i in range(3)]
    reqs.append(simple_req(RequestType.WRITE_ZEROES, segments((9, 1, 0))))
    await run(dev, *reqs, read_req(0, SECTOR))
    assert [name for name, _ in rec.calls].count("flush") == flushes
    if flushes:
        assert rec.calls[-1] == ("flush", 0)  # after the writes, before completion


async def test_writethrough_flush_failure_fails_the_writes(rec: Recording) -> None:
    dev = device_for(rec, 0)
    original = rec.flush

    def failing_flush() -> None:
        original()
        raise OSError(5, "flush failed")

    rec.flush = failing_flush  # type: ignore[method-assign]
    write, read = write_req(0, bytes(SECTOR)), read_req(0, SECTOR)
    await run(dev, write, read)
    assert (write.status, read.status) == (IOERR, OK)


# --- multiqueue and proxies ------------------------------------------------------------


class Gate(RamBackend):
    """Reads at sector 0 wait until a write at sector 1 happened (on another queue)."""

    def __init__(self) -> None:
        super().__init__(SIZE)
        self.written = threading.Event()

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if offset == 0 and not self.written.wait(10):
            raise OSError(110, "the other queue never ran")
        super().read(offset, buffers)

    def write(self, offset: int, buffers: Sequence[memoryview]) -> None:
        super().write(offset, buffers)
        self.written.set()


async def test_queues_proceed_independently() -> None:
    backend = Gate()
    dev = BlkDevice(backend, queues=2)
    dev.set_features(BlkFeature.FLUSH | BlkFeature.MQ)
    q0, q1 = ListQueue(0), ListQueue(1)
    blocked = read_req(0, SECTOR)
    q0.add(blocked)
    q1.add(write_req(1, b"\x01" * SECTOR), write_req(2, b"\x02" * SECTOR))
    for q in (q0, q1):
        dev.start_queue(q)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:  # each queue on a thread, as workers are
            nursery.start_soon(trio.to_thread.run_sync, dev.handle, q0)
            nursery.start_soon(trio.to_thread.run_sync, dev.handle, q1)
    assert blocked.status == OK
    stats = dev.stats()
    assert (stats["queue0_requests"], stats["queue1_requests"]) == (1, 2)
    backend.close()


class Proxy(BlockBackend):
    """Forwards to a backend served by another thread and blocks on its reply, the way
    a driver-domain proxy blocks on its IPC ring (data copied, as with memory=copy)."""

    def __init__(self, target: BlockBackend) -> None:
        self.size, self.serial = target.size, target.serial
        self._requests: queue.Queue[tuple[str, tuple[object, ...]] | None] = queue.Queue()
        self._replies: queue.Queue[object] = queue.Queue()
        self._server = threading.Thread(target=self._serve, args=(target,), daemon=True)
        self._server.start()

    def _serve(self, target: BlockBackend) -> None:
        while (item := self._requests.get()) is not None:
            name, args = item
            try:
                if name == "read":
                    offset, length = args
                    buf = bytearray(length)  # type: ignore[arg-type]
                    target.read(offset, [memoryview(buf)])  # type: ignore[arg-type]
                    self._replies.put(bytes(buf))
                elif name == "write":
                    offset, data = args
                    target.write(offset, [memoryview(data)])  # type: ignore[arg-type]
                    self._replies.put(None)
                else:
                    self._replies.put(getattr(target, name)(*args))
            except OSError as exc:
                self._replies.put(exc)

    def _call(self, name: str, *args: object) -> object:
        self._requests.put((name, args))
        reply = self._replies.get()
        if isinstance(reply, OSError):
            raise reply
        return reply

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        data = self._call("read", offset, sum(b.nbytes for b in buffers))
        assert isinstance(data, bytes)
        for b in buffers:
            b[:] = data[: b.nbytes]
            data = data[b.nbytes :]

    def write(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._call("write", offset, b"".join(buffers))

    def flush(self) -> None:
        self._call("flush")

    def discard(self, offset: int, length: int) -> None:
        self._call("discard", offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._call("write_zeroes", offset, length, unmap)

    def close(self) -> None:
        self._requests.put(None)
        self._server.join()


async def test_device_works_unchanged_over_a_blocking_proxy() -> None:
    target = RamBackend(SIZE, serial="proxied")
    dev = BlkDevice(Proxy(target))
    dev.set_features(BlkFeature.FLUSH | BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES)
    assert dev.features() & BlkFeature.DISCARD
    data = os.urandom(4 * SECTOR)
    reqs = [
        write_req(8, data),
        simple_req(RequestType.FLUSH),
        simple_req(RequestType.WRITE_ZEROES, segments((9, 1, 1))),
        read_req(8, 4 * SECTOR),
        simple_req(RequestType.GET_ID, writable=[20, 1]),
    ]
    await run(dev, *reqs)
    assert [r.status for r in reqs] == [OK] * 5
    assert reqs[3].data_in == data[:SECTOR] + bytes(SECTOR) + data[2 * SECTOR :]
    assert reqs[4].data_in.rstrip(b"\0") == b"proxied"
    dev.close()
    target.close()


# --- logical block size ------------------------------------------------------------------


async def test_a_4096_byte_block_disk_refuses_misaligned_requests() -> None:
    backend = RamBackend(SIZE, block_size=4096)
    dev = device_for(backend)
    assert le32(dev.config(), 20) == 4096  # blk_size
    data = os.urandom(8192)
    ok_write, ok_read = write_req(8, data), read_req(8, 8192)
    short = read_req(8, 512)  # one sector, not one block
    off = read_req(1, 4096)  # sector 1 is inside block 0
    await run(dev, ok_write, ok_read, short, off)
    assert [r.status for r in (ok_write, ok_read, short, off)] == [OK, OK, IOERR, IOERR]
    assert ok_read.data_in == data
    backend.close()


@pytest.mark.parametrize("factory", [RamBackend, NullBackend])
def test_block_size_option_is_checked(factory: Callable[..., BlockBackend]) -> None:
    assert factory(SIZE, block_size="4096").block_size == 4096
    with pytest.raises(BackendError, match="block_size: 3000 is not one of"):
        factory(SIZE, block_size=3000)
    with pytest.raises(BackendError, match="not whole 4096-byte blocks"):
        factory(SIZE + SECTOR, block_size=4096)


def test_file_backend_takes_a_block_size(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    backend = FileBackend(image, block_size=4096)
    assert backend.block_size == 4096
    backend.close()
