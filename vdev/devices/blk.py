"""virtio-blk (virtio 1.2, section 5.2): requests on the queues, I/O on a BlockBackend.

A request is a 16-byte header at the front of the device-readable buffers, data, and
a status byte at the very end of the device-writable buffers. Data buffers reach the
backend as memoryviews into guest memory (sliced, never copied).

Each queue works in groups: pop available chains and validate them on the event loop,
run a group's backend calls in one hop (`BlkDevice.offload`, a worker thread by
default), then push its completions and notify once. Small requests share a group (up
to `MIN_GROUP_BYTES`); a backend with `max_concurrency` > 1 (the file backend) gets
that many groups in flight per queue, so large transfers overlap. Queues are served
independently; a proxy backend (one that forwards to a driver domain) works unchanged.
"""

from __future__ import annotations

import functools
import logging
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import NamedTuple, Protocol, TypeVar

import outcome
import trio

from vdev.backend import BlockBackend
from vdev.devices.base import Device, DeviceError, Queue
from vdev.trioutil import unwrap_single
from vdev.units import parse_int
from vdev.virtio.chain import DescriptorChain

log = logging.getLogger(__name__)

_T = TypeVar("_T")

SECTOR_SIZE = 512
#: Length of the device ID string (VIRTIO_BLK_T_GET_ID).
ID_BYTES = 20
#: Segments per request offered in `seg_max`. A driver must not build a chain longer
#: than the queue, and QEMU's vhost-user-blk queues default to 128 entries: leave room
#: for the header and the status (what QEMU itself offers for such a queue).
SEG_MAX_QUEUE = 128
#: Limits of one discard / write-zeroes request (sectors, and segments).
MAX_DISCARD_SECTORS = (1 << 30) // SECTOR_SIZE
MAX_DISCARD_SEGMENTS = 32
#: Data worth a hop of its own: smaller requests are grouped up to this size, so that
#: a thread wake-up is not paid for every 4 KiB.
MIN_GROUP_BYTES = 64 * 1024


class BlkFeature(IntFlag):
    """virtio-blk feature bits."""

    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14


class RequestType(IntEnum):
    """`type` of a virtio_blk_req."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(IntEnum):
    """The status byte a request completes with."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


class SegmentFlag(IntFlag):
    """`flags` of a discard / write-zeroes segment."""

    UNMAP = 1


#: struct virtio_blk_req header: type, reserved, sector.
REQUEST_HEADER = struct.Struct("<IIQ")
#: struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags.
SEGMENT = struct.Struct("<QII")
#: struct virtio_blk_config up to the write-zeroes fields: capacity, size_max, seg_max,
#: geometry (cylinders, heads, sectors), blk_size, topology (physical_block_exp,
#: alignment_offset, min_io_size, opt_io_size), writeback, unused0, num_queues,
#: max_discard_sectors, max_discard_seg, discard_sector_alignment,
#: max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3].
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
#: Offset of `writeback`, the only field a driver may write.
WRITEBACK_OFFSET = 32

_WRITES = frozenset({RequestType.OUT, RequestType.DISCARD, RequestType.WRITE_ZEROES})
_STAT_NAMES = {t: f"{t.name.lower()}_requests" for t in RequestType}


class Offload(Protocol):
    """Runs a batch's backend work for queue `queue_index` without blocking the loop."""

    def __call__(self, queue_index: int, work: Callable[[], _T], /) -> Awaitable[_T]: ...


async def run_in_thread(queue_index: int, work: Callable[[], _T]) -> _T:
    """The default offload: one of trio's cached worker threads.

    The lean path under `trio.to_thread.run_sync` (no capacity limiter, no calls back
    into trio): this hop is paid on every request. Like ``run_sync``, it is not
    cancellable: the work always completes.
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[_T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(work, deliver, name="vdev-blk-io")
    return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)  # type: ignore[no-any-return]


async def run_inline(queue_index: int, work: Callable[[], _T]) -> _T:
    """Run on the event loop itself: for backends that never block (or tests)."""
    return work()


class Range(NamedTuple):
    """One discard / write-zeroes segment, in bytes."""

    offset: int
    length: int
    unmap: bool


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request, ready for the backend."""

    type: RequestType
    #: Byte offset (IN, OUT).
    offset: int = 0
    #: Data buffers: guest → disk for OUT, disk → guest for IN and GET_ID.
    data: tuple[memoryview, ...] = ()
    length: int = 0
    #: DISCARD and WRITE_ZEROES segments.
    ranges: tuple[Range, ...] = ()


@dataclass(slots=True, eq=False)
class _Job:
    """One chain of a batch, from parsing to completion."""

    chain: DescriptorChain
    #: The status byte (last writable byte); None if the chain has no writable byte.
    status_byte: memoryview | None
    #: The header's request type; None if the header is short.
    kind: int | None = None
    #: The validated request, None if it fails without reaching the backend.
    request: Request | None = None
    status: Status = Status.IOERR


class _Invalid(Exception):
    """A request that completes with `status` without reaching the backend."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def split_at(views: Sequence[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """Split a scatter list at byte `n` (slicing a view if needed; empty views dropped)."""
    head: list[memoryview] = []
    tail: list[memoryview] = []
    for view in views:
        if not view.nbytes:
            continue
        if n >= view.nbytes:
            head.append(view)
        elif n > 0:
            head.append(view[:n])
            tail.append(view[n:])
        else:
            tail.append(view)
        n = max(n - view.nbytes, 0)
    return head, tail


def _option(name: str, value: int | str, low: int, high: int) -> int:
    try:
        return parse_int(value, low, high)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _scatter(views: Sequence[memoryview], data: bytes) -> None:
    for view in views:
        chunk = data[: view.nbytes]
        view[: len(chunk)] = chunk
        data = data[len(chunk) :]


class BlkDevice(Device):
    """A virtio block device over `backend`.

    `serial` (or else the backend's) is the ID string the guest reads, at most 20
    ASCII characters. `offload` may be replaced before the device is served, to move
    the hop to the backend elsewhere.
    """

    device_id = 2

    def __init__(
        self,
        backend: BlockBackend,
        *,
        queues: int | str = 1,
        max_queue_size: int | str = 1024,
        serial: str = "",
    ) -> None:
        super().__init__(
            num_queues=_option("queues", queues, 1, 0xFFFF),
            # A request takes at least three descriptors: header, data, status.
            max_queue_size=_option("max_queue_size", max_queue_size, 3, 0x8000),
        )
        serial = serial or backend.serial
        try:
            self.serial = serial.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"serial: {serial!r} is not ASCII") from None
        if len(self.serial) > ID_BYTES:
            raise ValueError(f"serial: {serial!r} is longer than {ID_BYTES} characters")
        self.backend = backend
        self.offload: Offload = run_in_thread
        self.capacity = backend.size // SECTOR_SIZE
        self.writeback = True
        self._stats: Counter[str] = Counter()

    # --- negotiation and configuration ---------------------------------------------

    def _topology(self) -> tuple[int, int] | None:
        """(physical_block_exp, min_io_size) if the backend has a larger physical block."""
        physical = getattr(self.backend, "physical_block_size", 0)
        ratio = physical // self.backend.block_size
        if ratio <= 1 or physical % self.backend.block_size or ratio & (ratio - 1):
            return None
        return ratio.bit_length() - 1, ratio

    def features(self) -> int:
        features = BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH
        features |= BlkFeature.CONFIG_WCE
        if self.num_queues > 1:
            features |= BlkFeature.MQ
        if self._topology() is not None:
            features |= BlkFeature.TOPOLOGY
        if self.backend.read_only:
            features |= BlkFeature.RO
        else:
            if self.backend.supports_discard:
                features |= BlkFeature.DISCARD
            if self.backend.supports_write_zeroes:
                features |= BlkFeature.WRITE_ZEROES
        return int(features)

    def config(self) -> bytes:
        physical_exp, min_io = self._topology() or (0, 0)
        max_sectors = MAX_DISCARD_SECTORS
        return CONFIG.pack(
            self.capacity,
            0,  # size_max: no limit (SIZE_MAX not offered)
            min(self.max_queue_size, SEG_MAX_QUEUE) - 2,
            0, 0, 0,  # geometry (GEOMETRY not offered)
            self.backend.block_size,
            physical_exp, 0, min_io, 0,  # topology
            int(self.writeback), 0, self.num_queues,
            max_sectors, MAX_DISCARD_SEGMENTS, self.backend.block_size // SECTOR_SIZE,
            max_sectors, MAX_DISCARD_SEGMENTS, 1,
        )  # fmt: skip

    def write_config(self, offset: int, data: bytes) -> None:
        if offset != WRITEBACK_OFFSET or len(data) != 1:
            raise DeviceError(f"only `writeback` is writable (write at {offset}+{len(data)})")
        if not self.acked_features & BlkFeature.CONFIG_WCE:
            raise DeviceError("writeback written without VIRTIO_BLK_F_CONFIG_WCE")
        if data[0] > 1:
            raise DeviceError(f"writeback: invalid cache mode {data[0]}")
        self.writeback = bool(data[0])
        log.info("cache mode: %s", "writeback" if self.writeback else "writethrough")

    def set_features(self, features: int) -> None:
        super().set_features(features)
        if features & BlkFeature.CONFIG_WCE and not features & BlkFeature.FLUSH:
            self.writeback = False

    @property
    def writethrough(self) -> bool:
        """Whether writes must be durable before they complete (virtio 1.2, 5.2.6.2)."""
        if self.acked_features & BlkFeature.CONFIG_WCE:
            return not self.writeback
        return not self.acked_features & BlkFeature.FLUSH

    def reset(self) -> None:
        super().reset()
        self.writeback = True

    # --- requests --------------------------------------------------------------------

    async def handle(self, queue: Queue) -> None:
        """Serve the queue until it is empty and no request is in flight.

        Chains are taken in groups of at least `MIN_GROUP_BYTES` of data (or whatever is
        available), and each group's backend work runs in one hop (`offload`). A
        backend that accepts `max_concurrency` > 1 calls at once gets that many groups
        in flight; chains beyond them wait in the ring. Each group completes (push,
        then one notify) as soon as its hop returns, and frees its place for the next.
        """
        lanes = max(1, int(getattr(self.backend, "max_concurrency", 1)))
        done_send, done_receive = trio.open_memory_channel[None](lanes)
        busy = 0
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                while True:
                    for group in self._take(queue, lanes - busy):
                        nursery.start_soon(self._run, queue, group, done_send)
                        busy += 1
                    if not busy:
                        return
                    await done_receive.receive()
                    busy -= 1

    def _take(self, queue: Queue, groups: int) -> list[list[_Job]]:
        """Up to `groups` groups of the chains available now, parsed."""
        taken: list[list[_Job]] = []
        group: list[_Job] = []
        size = 0
        while len(taken) < groups and (chain := queue.pop()) is not None:
            job = self._parse(chain)
            group.append(job)
            size += job.request.length if job.request is not None else 0
            if size >= MIN_GROUP_BYTES:
                taken.append(group)
                group, size = [], 0
        if group:
            taken.append(group)
        return taken

    async def _run(
        self, queue: Queue, jobs: list[_Job], done: trio.MemorySendChannel[None]
    ) -> None:
        """Execute one group of a batch in one hop, then complete it."""
        requests = [job.request for job in jobs if job.request is not None]
        if requests:
            work = functools.partial(self._execute, requests, self.writethrough)
            statuses = iter(await self.offload(queue.index, work))
            for job in jobs:
                if job.request is not None:
                    job.status = next(statuses)
        for job in jobs:
            queue.push(job.chain, self._complete(queue.index, job))
        queue.notify()
        done.send_nowait(None)

    def _parse(self, chain: DescriptorChain) -> _Job:
        """Split a chain into header, data and status byte, and validate the request."""
        data_in, status_part = split_at(chain.writable, chain.writable_len - 1)
        if not status_part:
            log.warning("request %d has no status byte; completed with nothing", chain.head)
            return _Job(chain, None)
        job = _Job(chain, status_part[0])
        header, data_out = split_at(chain.readable, REQUEST_HEADER.size)
        raw = b"".join(header)
        if len(raw) < REQUEST_HEADER.size:
            log.warning("request %d has a header of %d bytes", chain.head, len(raw))
            return job
        job.kind, _reserved, sector = REQUEST_HEADER.unpack(raw)
        try:
            job.request = self._request(job.kind, sector, data_out, data_in)
        except _Invalid as exc:
            log.debug("request %d: %s", chain.head, exc)
            job.status = exc.status
        return job

    def _request(
        self, kind: int, sector: int, data_out: list[memoryview], data_in: list[memoryview]
    ) -> Request:
        """The request a header describes; `_Invalid` if it must fail without I/O."""
        if kind == RequestType.IN:
            return self._transfer(RequestType.IN, sector, data_in)
        if kind == RequestType.OUT:
            self._check_writable()
            return self._transfer(RequestType.OUT, sector, data_out)
        if kind == RequestType.FLUSH:
            return Request(RequestType.FLUSH)
        if kind == RequestType.GET_ID:
            length = sum(v.nbytes for v in data_in)
            if length < ID_BYTES:
                raise _Invalid(Status.IOERR, f"GET_ID buffer of {length} bytes")
            return Request(RequestType.GET_ID, data=tuple(data_in), length=length)
        if kind == RequestType.DISCARD and self.backend.supports_discard:
            return self._segments(RequestType.DISCARD, data_out)
        if kind == RequestType.WRITE_ZEROES and self.backend.supports_write_zeroes:
            return self._segments(RequestType.WRITE_ZEROES, data_out)
        raise _Invalid(Status.UNSUPP, f"request type {kind} not supported")

    def _check_writable(self) -> None:
        if self.backend.read_only:
            raise _Invalid(Status.IOERR, "write to a read-only disk")

    def _check_range(self, sector: int, sectors: int) -> None:
        if sector + sectors > self.capacity:
            raise _Invalid(
                Status.IOERR, f"sectors {sector}+{sectors} past the end ({self.capacity})"
            )

    def _transfer(self, kind: RequestType, sector: int, data: list[memoryview]) -> Request:
        length = sum(v.nbytes for v in data)
        if length % SECTOR_SIZE:
            raise _Invalid(Status.IOERR, f"{kind.name} of {length} bytes, not whole sectors")
        self._check_range(sector, length // SECTOR_SIZE)
        return Request(kind, sector * SECTOR_SIZE, tuple(data), length)

    def _segments(self, kind: RequestType, payload: list[memoryview]) -> Request:
        self._check_writable()
        raw = b"".join(payload)
        count, rest = divmod(len(raw), SEGMENT.size)
        if rest or not 0 < count <= MAX_DISCARD_SEGMENTS:
            raise _Invalid(Status.IOERR, f"{kind.name} payload of {len(raw)} bytes")
        ranges = []
        for sector, sectors, flags in SEGMENT.iter_unpack(raw):
            if flags & ~int(SegmentFlag.UNMAP) or (kind == RequestType.DISCARD and flags):
                raise _Invalid(Status.UNSUPP, f"{kind.name} with flags {flags:#x}")
            if sectors > MAX_DISCARD_SECTORS:
                raise _Invalid(Status.IOERR, f"{kind.name} of {sectors} sectors")
            self._check_range(sector, sectors)
            ranges.append(
                Range(sector * SECTOR_SIZE, sectors * SECTOR_SIZE, bool(flags & SegmentFlag.UNMAP))
            )
        return Request(kind, ranges=tuple(ranges))

    def _execute(self, requests: list[Request], writethrough: bool) -> list[Status]:
        """Run a batch on the backend (in the offload context, not on the event loop)."""
        statuses = [self._execute_one(r) for r in requests]
        if writethrough:
            wrote = [i for i, r in enumerate(requests) if r.type in _WRITES and not statuses[i]]
            if wrote and self._execute_one(Request(RequestType.FLUSH)) != Status.OK:
                for i in wrote:
                    statuses[i] = Status.IOERR
        return statuses

    def _execute_one(self, request: Request) -> Status:
        backend = self.backend
        try:
            match request.type:
                case RequestType.IN:
                    backend.read(request.offset, request.data)
                case RequestType.OUT:
                    backend.write(request.offset, request.data)
                case RequestType.FLUSH:
                    backend.flush()
                case RequestType.GET_ID:
                    _scatter(request.data, self.serial.ljust(request.length, b"\0"))
                case RequestType.DISCARD:
                    for r in request.ranges:
                        backend.discard(r.offset, r.length)
                case RequestType.WRITE_ZEROES:
                    for r in request.ranges:
                        backend.write_zeroes(r.offset, r.length, r.unmap)
        except OSError as exc:
            log.warning("%s at byte %d failed: %s", request.type.name, request.offset, exc)
            return Status.IOERR
        except Exception:
            log.exception("%s at byte %d: backend error", request.type.name, request.offset)
            return Status.IOERR
        return Status.OK

    def _complete(self, index: int, job: _Job) -> int:
        """Write the status byte and count the request; return the used length."""
        stats = self._stats
        stats["requests"] += 1
        stats[f"queue{index}_requests"] += 1
        if job.kind is not None:
            stats[_STAT_NAMES.get(job.kind, "other_requests")] += 1
        if job.status != Status.OK:
            stats["errors"] += 1
            stats["unsupported"] += job.status == Status.UNSUPP
        if job.status_byte is None:
            return 0
        job.status_byte[0] = job.status
        request = job.request
        if job.status == Status.OK and request is not None:
            if request.type == RequestType.IN:
                stats["bytes_read"] += request.length
            elif request.type == RequestType.OUT:
                stats["bytes_written"] += request.length
        # The status byte ends the writable area, so the whole area is the response
        # (what QEMU reports too; drivers ignore it).
        return job.chain.writable_len

    def stats(self) -> dict[str, int]:
        """Requests (total, per type, per queue), bytes read and written, errors."""
        keys = ["requests", *_STAT_NAMES.values(), "other_requests"]
        keys += ["bytes_read", "bytes_written", "errors"]
        keys += ["unsupported", *(f"queue{i}_requests" for i in range(self.num_queues))]
        return {key: self._stats[key] for key in keys}

    def close(self) -> None:
        self.backend.close()
