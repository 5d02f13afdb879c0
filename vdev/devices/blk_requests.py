"""virtio-blk requests as data, and the executors that run them on a BlockBackend.

`BlkDevice` turns descriptor chains into `BlkRequest`s and hands a batch to its
queue's executor, which sets each request's status. `execute` is the one place where
a request becomes a backend call: the inline executor calls it on the queue's worker
thread, the pool executor on I/O threads, and a driver-domain child on its side of the
channel (`vdev.domain`).
"""

from __future__ import annotations

import logging
import queue as queue_module
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple, Protocol

from vdev.backend import BlockBackend
from vdev.virtio.chain import DescriptorChain, trim_addrs

log = logging.getLogger(__name__)


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


#: Request types that change the disk (a write-through disk flushes after them).
WRITES = frozenset({RequestType.OUT, RequestType.DISCARD, RequestType.WRITE_ZEROES})
#: Bytes of a virtio_blk_req header.
HEADER_BYTES = 16


class Range(NamedTuple):
    """One discard / write-zeroes segment, in bytes."""

    offset: int
    length: int
    unmap: bool


@dataclass(slots=True, eq=False)
class BlkRequest:
    """One request for the backend: what to do, where, with which guest buffers."""

    type: int
    #: Byte offset (IN, OUT).
    offset: int = 0
    #: Data buffers as views: guest -> disk for OUT, disk -> guest for IN.
    data: Sequence[memoryview] = ()
    length: int = 0
    #: DISCARD and WRITE_ZEROES segments.
    ranges: tuple[Range, ...] = ()
    #: The chain it came from (None for requests the device makes itself: a flush).
    chain: DescriptorChain | None = field(default=None, repr=False)
    #: Where the device writes the status (the last writable byte of the chain).
    status_byte: memoryview | None = field(default=None, repr=False)
    status: int = Status.OK

    def guest_segments(self) -> list[int]:
        """The data buffers as guest (address, length) pairs, flat: for executors that
        pass references instead of views (a driver domain that maps guest memory)."""
        chain = self.chain
        if chain is None or not self.length:
            return []
        if self.type == RequestType.IN:
            return trim_addrs(chain.writable_addrs, 0, 1)
        return trim_addrs(chain.readable_addrs, HEADER_BYTES, 0)


def execute(backend: BlockBackend, request: BlkRequest) -> int:
    """Run one request on `backend`; its status (IOERR for any backend failure)."""
    try:
        match request.type:
            case RequestType.IN:
                backend.read(request.offset, request.data)
            case RequestType.OUT:
                backend.write(request.offset, request.data)
            case RequestType.FLUSH:
                backend.flush()
            case RequestType.DISCARD:
                for r in request.ranges:
                    backend.discard(r.offset, r.length)
            case RequestType.WRITE_ZEROES:
                for r in request.ranges:
                    backend.write_zeroes(r.offset, r.length, r.unmap)
            case _:
                return Status.UNSUPP
    except OSError as exc:
        log.warning("%s at byte %d failed: %s", _name(request.type), request.offset, exc)
        return Status.IOERR
    except Exception:
        log.exception("%s at byte %d: backend error", _name(request.type), request.offset)
        return Status.IOERR
    return Status.OK


def _name(kind: int) -> str:
    try:
        return RequestType(kind).name
    except ValueError:
        return f"type {kind}"


class Executor(Protocol):
    """Runs a batch of requests to completion and sets each one's status."""

    def run(self, requests: Sequence[BlkRequest]) -> None: ...

    def close(self) -> None: ...


class InlineExecutor:
    """In-process: the backend is called on the queue's worker thread, in order."""

    def __init__(self, backend: BlockBackend) -> None:
        self.backend = backend

    def run(self, requests: Sequence[BlkRequest]) -> None:
        backend = self.backend
        for request in requests:
            request.status = execute(backend, request)

    def close(self) -> None:
        pass


class PoolExecutor:
    """In-process with I/O threads: requests larger than `inline_bytes` run on a pool
    of `threads` threads (concurrently: os.preadv releases the GIL), smaller ones
    inline meanwhile (or, if there are none, one of the large ones): for large
    page-cache copies, which then use both CPUs, and O_DIRECT files where Linux AIO is
    not to be had (`vdev.devices.aio`).

    A pool of threads rather than io_uring or Linux AIO: the maintained Python
    bindings are tied to asyncio (caio) or need a native build (liburing), and a
    blocking preadv per thread gives the kernel as many requests in flight.
    """

    def __init__(self, backend: BlockBackend, threads: int, inline_bytes: int) -> None:
        self.backend = backend
        self.inline_bytes = inline_bytes
        self._todo: queue_module.SimpleQueue[
            tuple[BlkRequest, queue_module.SimpleQueue[None]] | None
        ] = queue_module.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"vdev-io{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, requests: Sequence[BlkRequest]) -> None:
        done: queue_module.SimpleQueue[None] = queue_module.SimpleQueue()
        inline = [r for r in requests if r.length <= self.inline_bytes]
        large = [r for r in requests if r.length > self.inline_bytes]
        if large and not inline:
            inline.append(large.pop())  # this thread works too, rather than only wait
        for request in large:
            self._todo.put((request, done))
        for request in inline:
            request.status = execute(self.backend, request)
        for _ in large:
            done.get()

    def _serve(self) -> None:
        while (item := self._todo.get()) is not None:
            request, done = item
            request.status = execute(self.backend, request)
            done.put(None)

    def close(self) -> None:
        for _ in self._threads:
            self._todo.put(None)
        for thread in self._threads:
            thread.join()
