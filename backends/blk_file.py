"""A disk image: a raw file (or a host block device) accessed with preadv/pwritev.

Guest buffers go straight to the kernel (no copy in Python); holes are punched for
discards, so a sparse image stays sparse.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from enum import IntFlag

from vdev.backend import BackendError, BlockBackend, block_size_option, bool_option

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
_IOV_MAX = os.sysconf("SC_IOV_MAX")
_ZERO_CHUNK = memoryview(bytes(1 << 20))

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

Transfer = Callable[[int, Sequence[memoryview], int], int]


class Falloc(IntFlag):
    """fallocate(2) modes (linux/falloc.h)."""

    KEEP_SIZE = 0x01
    PUNCH_HOLE = 0x02
    ZERO_RANGE = 0x10


def _transfer(op: Transfer, fd: int, offset: int, buffers: Sequence[memoryview]) -> None:
    """Run os.preadv/os.pwritev until every buffer is done (short transfers resume)."""
    views = [buf for buf in buffers if buf.nbytes]
    while views:
        done = op(fd, views[:_IOV_MAX], offset)
        if done == 0:
            raise OSError(errno.EIO, "unexpected end of file")
        offset += done
        while views and done >= views[0].nbytes:
            done -= views.pop(0).nbytes
        if done:
            views[0] = views[0][done:]


class FileBackend(BlockBackend):
    """A raw image file or block device of a whole number of 512-byte sectors.

    `direct` opens it with O_DIRECT (no host page cache); requests whose buffers are
    not aligned for it go through an ordinary descriptor of the same file instead.
    """

    #: preadv/pwritev are safe from several threads at once: up to this many calls run
    #: at once on I/O threads, so that transfers overlap on the host disk and copies
    #: out of the page cache use every CPU.
    max_concurrency = 8
    #: Page-cache requests up to this size are served inline on the queue's thread
    #: (cheaper than a hand-off); with O_DIRECT every request goes to an I/O thread.
    inline_bytes = 64 * 1024

    def __init__(
        self,
        path: str | os.PathLike[str],
        readonly: bool | str = False,
        direct: bool | str = False,
        serial: str = "",
        block_size: int | str = 512,
    ) -> None:
        self.path = os.fspath(path)
        self.read_only = bool_option("readonly", readonly)
        direct = bool_option("direct", direct)
        self.serial = serial
        self._direct_fd: int | None = None
        self._unsupported: set[Falloc] = set()
        self._fd = self._open(0)
        try:
            st = os.fstat(self._fd)
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
            if self.size == 0 or self.size % SECTOR_SIZE:
                raise BackendError(
                    f"path: {self.path} is {self.size} bytes, not a (non-zero) multiple of "
                    f"{SECTOR_SIZE}"
                )
            self.block_size = block_size_option(block_size, self.size)
            #: The host file system's block: the guest aligns its I/O to it (topology).
            self.physical_block_size = st.st_blksize if stat.S_ISREG(st.st_mode) else 0
            if direct:
                self._direct_fd = self._open(os.O_DIRECT)
                self.inline_bytes = 0
        except BaseException:
            self.close()
            raise

    def _open(self, extra_flags: int) -> int:
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            raise BackendError(f"path: {self.path} does not exist") from None
        except OSError as exc:
            raise BackendError(f"path: {self.path}: {exc.strerror}") from None
        if stat.S_ISDIR(mode):
            raise BackendError(f"path: {self.path} is a directory")
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise BackendError(f"path: {self.path} is not a regular file or block device")
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC | extra_flags
        try:
            return os.open(self.path, flags)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and not self.read_only:
                raise BackendError(
                    f"path: {self.path} is not writable ({exc.strerror}); use readonly"
                ) from None
            if exc.errno == errno.EINVAL and extra_flags & os.O_DIRECT:
                raise BackendError(
                    f"direct: the file system of {self.path} does not support O_DIRECT"
                ) from None
            raise BackendError(f"path: {self.path}: {exc.strerror}") from None

    # --- I/O ---------------------------------------------------------------------------

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._io(os.preadv, offset, buffers)

    def write(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if offset + sum(buf.nbytes for buf in buffers) > self.size:  # shrunk meanwhile
            raise OSError(errno.EIO, "write past the end of the disk")
        self._io(os.pwritev, offset, buffers)

    def _io(self, op: Transfer, offset: int, buffers: Sequence[memoryview]) -> None:
        if self._direct_fd is not None:
            try:
                _transfer(op, self._direct_fd, offset, buffers)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.debug("%s: unaligned request at %d, not using O_DIRECT", self.path, offset)
        _transfer(op, self._fd, offset, buffers)

    @property
    def direct_fd(self) -> int | None:  # type: ignore[override]
        """The O_DIRECT descriptor (`direct`), for executors that submit to it."""
        return self._direct_fd

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        # Advisory: where holes cannot be punched the data simply stays.
        self._fallocate(Falloc.PUNCH_HOLE | Falloc.KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if unmap and self._fallocate(Falloc.PUNCH_HOLE | Falloc.KEEP_SIZE, offset, length):
            return
        if self._fallocate(Falloc.ZERO_RANGE | Falloc.KEEP_SIZE, offset, length):
            return
        end = offset + length
        while offset < end:
            chunk = _ZERO_CHUNK[: min(end - offset, _ZERO_CHUNK.nbytes)]
            _transfer(os.pwritev, self._fd, offset, [chunk])
            offset += chunk.nbytes

    def _fallocate(self, mode: Falloc, offset: int, length: int) -> bool:
        """fallocate(2); False if the file system does not support `mode`."""
        if mode in self._unsupported:
            return False
        if _fallocate(self._fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            log.info("%s: the file system does not support fallocate mode %r", self.path, mode)
            self._unsupported.add(mode)
            return False
        raise OSError(err, f"fallocate: {os.strerror(err)}")

    def resize(self, size: int) -> None:
        """Truncate or extend the image file (extended, it reads as zeros)."""
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            raise BackendError(f"path: {self.path} is not a regular file; resize it on the host")
        old, self.size = self.size, min(self.size, size)  # shrinking: writes stop first
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            self.size = old
            raise
        self.size = size

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd = -1
        self._direct_fd = None
