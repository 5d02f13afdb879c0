"""An executor for O_DIRECT files: a batch's reads and writes in flight at once with
Linux AIO (io_submit / io_getevents, called through ctypes).

With O_DIRECT, Linux AIO is truly asynchronous: one io_submit puts every read and
write of a batch in the disk's queue and one io_getevents waits for them all, two
system calls per batch instead of a thread wake-up per request. Requests AIO does not
cover (flush, discard, write zeroes) and any that O_DIRECT refuses (a buffer or offset
not aligned for it: EINVAL) or completes short go through `execute` on the backend, as
the inline executor would run them.

Why not a binding from PyPI: the maintained ones are tied to asyncio (caio) or need a
native build (liburing); the kernel ABI below is small and stable.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
from collections.abc import Sequence

from vdev.backend import BlockBackend
from vdev.devices.blk_requests import (
    BlkRequest,
    Executor,
    InlineExecutor,
    PoolExecutor,
    RequestType,
    Status,
    execute,
)

log = logging.getLogger(__name__)

#: System call numbers of the AIO calls (x86-64 and arm64 generic table).
_SYSCALLS = {
    "x86_64": {"setup": 206, "destroy": 207, "getevents": 208, "submit": 209},
    "aarch64": {"setup": 0, "destroy": 1, "getevents": 4, "submit": 2},
}
_IOCB_CMD_PREADV = 7
_IOCB_CMD_PWRITEV = 8
#: Requests in flight at once in one context (a batch larger than this goes in parts).
DEPTH = 256

_libc = ctypes.CDLL(None, use_errno=True)  # CDLL: the GIL is released during calls
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _IoCb(ctypes.Structure):
    """struct iocb (linux/aio_abi.h, little-endian)."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("key", ctypes.c_uint32),
        ("rw_flags", ctypes.c_int32),
        ("opcode", ctypes.c_uint16),
        ("reqprio", ctypes.c_int16),
        ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64),
        ("nbytes", ctypes.c_uint64),
        ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    """struct io_event."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _call(name: str, *args: object) -> int:
    number = _SYSCALLS[platform.machine()][name]
    while True:
        result = int(_syscall(ctypes.c_long(number), *args))
        if result >= 0:
            return result
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"io_{name}: {os.strerror(err)}")


def available() -> bool:
    """Whether this machine has Linux AIO (known architecture, io_setup allowed)."""
    if platform.machine() not in _SYSCALLS:
        return False
    try:
        context = _Context(1)
    except OSError:
        return False
    context.close()
    return True


class _Context:
    """An aio_context_t."""

    def __init__(self, depth: int) -> None:
        self.handle = ctypes.c_ulong(0)
        _call("setup", ctypes.c_uint(depth), ctypes.byref(self.handle))

    def close(self) -> None:
        if self.handle.value:
            _call("destroy", self.handle)
            self.handle.value = 0


class AioExecutor:
    """Runs a batch's transfers on `fd` (the backend's O_DIRECT descriptor) with AIO."""

    def __init__(self, backend: BlockBackend, fd: int, depth: int = DEPTH) -> None:
        self.backend = backend
        self.fd = fd
        self.depth = depth
        self._context = _Context(depth)
        self._events = (_IoEvent * depth)()

    def run(self, requests: Sequence[BlkRequest]) -> None:
        transfers = [r for r in requests if r.type in (RequestType.IN, RequestType.OUT)]
        if len(transfers) == 1:  # nothing to overlap: a plain preadv is cheaper
            transfers[0].status = execute(self.backend, transfers[0])
            transfers = []
        for start in range(0, len(transfers), self.depth):
            self._transfer(transfers[start : start + self.depth])
        for request in requests:
            if request.type not in (RequestType.IN, RequestType.OUT):
                request.status = execute(self.backend, request)

    def _transfer(self, requests: Sequence[BlkRequest]) -> None:
        count = len(requests)
        iocbs = (_IoCb * count)()
        pointers = (ctypes.POINTER(_IoCb) * count)()
        keep = []  # the iovec arrays and buffer exports live until the I/O is done
        for i, request in enumerate(requests):
            iovecs = (_IoVec * len(request.data))()
            for j, view in enumerate(request.data):
                buffer = (ctypes.c_char * view.nbytes).from_buffer(view)
                keep.append(buffer)
                iovecs[j].base = ctypes.addressof(buffer)
                iovecs[j].len = view.nbytes
            keep.append(iovecs)
            cb = iocbs[i]
            cb.data = i
            cb.opcode = _IOCB_CMD_PREADV if request.type == RequestType.IN else _IOCB_CMD_PWRITEV
            cb.fildes = self.fd
            cb.buf = ctypes.addressof(iovecs)
            cb.nbytes = len(request.data)
            cb.offset = request.offset
            pointers[i] = ctypes.pointer(cb)
        submitted = 0
        try:
            while submitted < count:
                first = ctypes.addressof(pointers) + submitted * ctypes.sizeof(ctypes.c_void_p)
                submitted += _call(
                    "submit",
                    self._context.handle,
                    ctypes.c_long(count - submitted),
                    ctypes.c_void_p(first),
                )
        except OSError as exc:
            log.warning("io_submit failed (%s); running the rest one by one", exc)
            for request in requests[submitted:]:
                request.status = execute(self.backend, request)
        done = 0
        while done < submitted:
            got = _call(
                "getevents",
                self._context.handle,
                ctypes.c_long(submitted - done),
                ctypes.c_long(submitted - done),
                self._events,
                None,
            )
            for event in self._events[:got]:
                request = requests[event.data]
                if event.res != request.length:
                    # Refused (EINVAL: not aligned for O_DIRECT), failed or short: the
                    # backend redoes it its own way, and says what went wrong.
                    request.status = execute(self.backend, request)
                else:
                    request.status = Status.OK
            done += got
        del keep

    def close(self) -> None:
        self._context.close()


def default_executor(backend: BlockBackend) -> Executor:
    """The in-process executor a backend asks for: AIO on its O_DIRECT descriptor
    (`direct_fd`) where Linux AIO works, else I/O threads (`max_concurrency`,
    `inline_bytes`), else inline."""
    fd = backend.direct_fd
    if fd is not None and available():
        return AioExecutor(backend, fd)
    threads = max(1, int(getattr(backend, "max_concurrency", 1)))
    if threads == 1:
        return InlineExecutor(backend)
    return PoolExecutor(backend, threads, int(getattr(backend, "inline_bytes", 0)))
