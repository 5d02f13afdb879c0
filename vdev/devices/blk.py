"""virtio-blk (virtio 1.2, section 5.2): requests on the queues, I/O on a BlockBackend.

A request is a 16-byte header at the front of the device-readable buffers, data, and
a status byte at the very end of the device-writable buffers. Data buffers reach the
backend as memoryviews into guest memory (sliced, never copied).

Each queue is served on its worker thread: `handle` pops a batch of chains, turns them
into `BlkRequest`s, has the queue's executor run those that need the backend (inline,
on I/O threads, or in a driver domain: `executor_factory`), then writes every status,
publishes the used entries once and notifies once.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from enum import IntFlag

from vdev.backend import BackendError, BlockBackend, int_option
from vdev.devices.aio import default_executor
from vdev.devices.base import Device, DeviceError, Queue
from vdev.devices.blk_requests import (
    HEADER_BYTES,
    WRITES,
    BlkRequest,
    Executor,
    Range,
    RequestType,
    Status,
)
from vdev.virtio.chain import DescriptorChain

__all__ = ["BlkDevice", "BlkFeature", "BlkRequest", "RequestType", "Status"]

log = logging.getLogger(__name__)

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
#: Chains taken from a ring per batch, at most.
BATCH = 256


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

#: Feature bits tested per batch, as plain ints (IntFlag arithmetic is slow).
_CONFIG_WCE, _FLUSH = int(BlkFeature.CONFIG_WCE), int(BlkFeature.FLUSH)
_STAT_NAMES = {t: f"{t.name.lower()}_requests" for t in RequestType}
#: Every counter a queue keeps, all there from the start: another thread (the control
#: socket) may read them while the worker counts, so no key is ever added later.
_STAT_KEYS = (
    "requests", *_STAT_NAMES.values(), "other_requests",
    "bytes_read", "bytes_written", "errors", "unsupported",
)  # fmt: skip
#: What `queue_stats` shows of them.
_QUEUE_STAT_KEYS = ("requests", "bytes_read", "bytes_written", "errors")


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


def _scatter(views: Sequence[memoryview], data: bytes) -> None:
    for view in views:
        chunk = data[: view.nbytes]
        view[: len(chunk)] = chunk
        data = data[len(chunk) :]


class BlkDevice(Device):
    """A virtio block device over `backend`.

    `serial` (or else the backend's) is the ID string the guest reads, at most 20
    ASCII characters. `executor_factory(queue_index)` gives each queue the executor
    that runs its requests; replace it before the device is served to run them
    elsewhere (a driver domain does).
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
            num_queues=int_option("queues", queues, 1, 0xFFFF),
            # A request takes at least three descriptors: header, data, status.
            max_queue_size=int_option("max_queue_size", max_queue_size, 3, 0x8000),
        )
        serial = serial or backend.serial
        try:
            self.serial = serial.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"serial: {serial!r} is not ASCII") from None
        if len(self.serial) > ID_BYTES:
            raise ValueError(f"serial: {serial!r} is longer than {ID_BYTES} characters")
        self.backend = backend
        self.capacity = backend.size // SECTOR_SIZE
        self.writeback = True
        self._default_executor: Executor | None = None
        self.executor_factory: Callable[[int], Executor] = self._in_process
        self._executors: dict[int, Executor] = {}
        #: Counters per queue, each written by its queue's worker thread only.
        self._stats: list[Counter[str]] = [
            Counter(dict.fromkeys(_STAT_KEYS, 0)) for _ in range(self.num_queues)
        ]

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

    def resize(self, size: int) -> None:
        """Give the disk `size` bytes: the capacity the config space shows and requests
        are bounded by (the caller tells the front-end: `DeviceServer.resize`). A
        shrunk disk fails requests past its new end (IOERR). ValueError, one line, for
        a size or a backend that will not do."""
        backend = self.backend
        block = backend.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % block:
            raise ValueError(f"size: {size!r} is not a positive number of {block}-byte blocks")
        if backend.read_only:
            raise ValueError("a read-only disk cannot be resized")
        if not backend.supports_resize:
            raise ValueError(f"the {type(backend).__name__} backend cannot be resized")
        sectors = size // SECTOR_SIZE
        # Shrinking: new requests past the end are refused before the storage goes.
        self.capacity = min(self.capacity, sectors)
        try:
            backend.resize(size)
        except (OSError, BackendError) as exc:
            raise ValueError(f"resize to {size} bytes failed: {exc}") from None
        finally:
            self.capacity = backend.size // SECTOR_SIZE
        log.info("resized to %d bytes", size)

    def set_features(self, features: int) -> None:
        super().set_features(features)
        if features & BlkFeature.CONFIG_WCE and not features & BlkFeature.FLUSH:
            self.writeback = False

    @property
    def writethrough(self) -> bool:
        """Whether writes must be durable before they complete (virtio 1.2, 5.2.6.2)."""
        if self.acked_features & _CONFIG_WCE:
            return not self.writeback
        return not self.acked_features & _FLUSH

    def reset(self) -> None:
        super().reset()
        self.writeback = True

    # --- requests --------------------------------------------------------------------

    def _in_process(self, queue_index: int) -> Executor:
        """The default executor: the backend in this process, shared by the queues."""
        if self._default_executor is None:
            self._default_executor = default_executor(self.backend)
        return self._default_executor

    def start_queue(self, queue: Queue) -> None:
        if queue.index not in self._executors:
            self._executors[queue.index] = self.executor_factory(queue.index)

    def handle(self, queue: Queue) -> None:
        """Serve one batch: parse, run what needs the backend, complete all, notify."""
        chains = queue.pop_batch(BATCH)
        if not chains:
            return
        requests = [self._parse(chain) for chain in chains]
        todo = [r for r in requests if r.status == Status.OK and r.type != RequestType.GET_ID]
        if todo:
            self._executors[queue.index].run(todo)
            if self.writethrough:
                self._write_through(queue.index, todo)
        stats = self._stats[queue.index]
        stats["requests"] += len(requests)
        fill, complete = queue.fill, self._complete
        for request in requests:
            fill(request.chain, complete(stats, request))  # type: ignore[arg-type]
        queue.notify()

    def _write_through(self, index: int, requests: list[BlkRequest]) -> None:
        """Flush after a batch's writes; they fail if the flush does."""
        wrote = [r for r in requests if r.type in WRITES and r.status == Status.OK]
        if wrote:
            flush = BlkRequest(RequestType.FLUSH)
            self._executors[index].run([flush])
            if flush.status != Status.OK:
                for request in wrote:
                    request.status = Status.IOERR

    def _parse(self, chain: DescriptorChain) -> BlkRequest:
        """The request a chain holds, validated; one that must fail without reaching the
        backend comes with its status set (IOERR, UNSUPP)."""
        writable = chain.writable
        if not writable or not writable[-1].nbytes:
            data_in, status_part = split_at(writable, chain.writable_len - 1)
        else:  # the usual layout: the status byte ends the last buffer
            last = writable[-1]
            data_in = writable[:-1]
            if last.nbytes > 1:
                data_in.append(last[:-1])
            status_part = [last[-1:]]
        if not status_part:
            log.warning("request %d has no status byte; completed with nothing", chain.head)
            return BlkRequest(-1, chain=chain, status=Status.IOERR)
        readable = chain.readable
        first = readable[0] if readable else None
        if first is not None and first.nbytes >= HEADER_BYTES:
            raw = first[:HEADER_BYTES]
            data_out = readable[1:]
            if first.nbytes > HEADER_BYTES:
                data_out.insert(0, first[HEADER_BYTES:])
        else:
            header, data_out = split_at(readable, HEADER_BYTES)
            raw = b"".join(header)
        if len(raw) < HEADER_BYTES:
            log.warning("request %d has a header of %d bytes", chain.head, len(raw))
            request = BlkRequest(-1, chain=chain, status=Status.IOERR)
        else:
            kind, _reserved, sector = REQUEST_HEADER.unpack(raw)
            try:
                request = self._request(kind, sector, data_out, data_in)
            except _Invalid as exc:
                log.debug("request %d: %s", chain.head, exc)
                request = BlkRequest(kind, status=exc.status)
            request.chain = chain
        request.status_byte = status_part[0]
        return request

    def _request(
        self, kind: int, sector: int, data_out: list[memoryview], data_in: list[memoryview]
    ) -> BlkRequest:
        """The request a header describes; `_Invalid` if it must fail without I/O."""
        if kind == RequestType.IN:
            return self._transfer(RequestType.IN, sector, data_in)
        if kind == RequestType.OUT:
            self._check_writable()
            return self._transfer(RequestType.OUT, sector, data_out)
        if kind == RequestType.FLUSH:
            return BlkRequest(RequestType.FLUSH)
        if kind == RequestType.GET_ID:
            length = sum(v.nbytes for v in data_in)
            if length < ID_BYTES:
                raise _Invalid(Status.IOERR, f"GET_ID buffer of {length} bytes")
            _scatter(data_in, self.serial.ljust(length, b"\0"))
            return BlkRequest(RequestType.GET_ID, length=length)
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

    def _transfer(self, kind: RequestType, sector: int, data: list[memoryview]) -> BlkRequest:
        length = sum(v.nbytes for v in data) if len(data) != 1 else data[0].nbytes
        block = self.backend.block_size
        if length % block or sector * SECTOR_SIZE % block:
            raise _Invalid(
                Status.IOERR,
                f"{kind.name} of {length} bytes at sector {sector}: not whole {block}-byte blocks",
            )
        self._check_range(sector, length // SECTOR_SIZE)
        return BlkRequest(kind, sector * SECTOR_SIZE, data, length)

    def _segments(self, kind: RequestType, payload: list[memoryview]) -> BlkRequest:
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
        return BlkRequest(kind, ranges=tuple(ranges))

    def _complete(self, stats: Counter[str], request: BlkRequest) -> int:
        """Write the status byte and count the request; return the used length."""
        status = request.status
        kind = request.type
        stats[_STAT_NAMES.get(kind, "other_requests")] += 1  # type: ignore[call-overload]
        status_byte = request.status_byte
        if status:
            stats["errors"] += 1
            stats["unsupported"] += status == Status.UNSUPP
            if status_byte is None:
                return 0
            status_byte[0] = status
            # The used length counts from the first writable byte to the status byte
            # (what a dirty log marks during a migration), data read or not.
            return request.chain.writable_len if request.chain is not None else 1
        status_byte[0] = 0  # type: ignore[index]
        if kind == RequestType.IN:
            stats["bytes_read"] += request.length
            return request.length + 1
        if kind == RequestType.OUT:
            stats["bytes_written"] += request.length
        elif kind == RequestType.GET_ID:
            return request.length + 1
        return 1

    def stats(self) -> dict[str, int]:
        """Requests (total, per type, per queue), bytes read and written, errors."""
        out = {key: sum(counters[key] for counters in self._stats) for key in _STAT_KEYS}
        for index, counters in enumerate(self._stats):
            out[f"queue{index}_requests"] = counters["requests"]
        return out

    def queue_stats(self, index: int) -> dict[str, int]:
        counters = self._stats[index]
        return {key: counters[key] for key in _QUEUE_STAT_KEYS}

    def close(self) -> None:
        executors = [*self._executors.values(), self._default_executor]
        for executor in {id(e): e for e in executors if e is not None}.values():
            executor.close()
        self.backend.close()
