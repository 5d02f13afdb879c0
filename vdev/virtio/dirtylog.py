"""The dirty log of a live migration (VHOST_F_LOG_ALL, SET_LOG_BASE with LOG_SHMFD).

A bitmap in shared memory the front-end hands over: bit ``n % 8`` of byte ``n // 8``
stands for guest page ``n``, the 4 KiB at guest physical address ``n * 4096``. While the
front-end migrates the guest, the device sets the bit of every page it writes (the
rings call `DirtyLog.mark` for the data they report written and for their used-ring
stores), and the front-end sends those pages again.

Setting a bit must be an atomic OR. QEMU reads and clears the log concurrently, a u64
word at a time with an atomic exchange (`vhost_dev_sync_region`: ``qatomic_xchg``), and
it hands the same log to every vhost device of the VM (QEMU 7.2's ``vhost_log_shm``):
another back-end, or another queue thread of ours, may set a bit in the same byte at
the same moment. A plain read-modify-write of the byte would then store back a stale
value and lose the other writer's bit, and with it a page of the migration. Python has
no atomic OR on shared memory, so `mark` calls libatomic's ``__atomic_fetch_or_1``
through ctypes (a ``lock or`` on x86-64). Without libatomic (`available` is False)
vdev does not offer VHOST_F_LOG_ALL: QEMU then refuses to migrate the guest, which is
better than migrating it with pages missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os

from vdev.virtio.errors import VirtioError

#: Guest bytes per log bit (VHOST_LOG_PAGE).
LOG_PAGE = 4096
_SEQ_CST = 5  # __ATOMIC_SEQ_CST: our data stores are visible before the bit


def _load_fetch_or() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        # PyDLL: the call is a single instruction, not worth releasing the GIL for.
        fetch_or = ctypes.PyDLL(name).__atomic_fetch_or_1
    except (OSError, AttributeError):
        return None
    fetch_or.argtypes = (ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int)
    fetch_or.restype = ctypes.c_uint8
    return fetch_or


_fetch_or = _load_fetch_or()


def available() -> bool:
    """Whether dirty logging works here (libatomic is installed)."""
    return _fetch_or is not None


class DirtyLog:
    """The log the front-end shared (SET_LOG_BASE): `size` bytes of `fd` from `offset`.

    The caller keeps `fd`. The file must be sealed against shrinking (QEMU's memfd is):
    a log that shrank under a queue thread would kill the process with SIGBUS.
    Raises VirtioError if the log cannot be used.
    """

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        if _fetch_or is None:
            raise VirtioError("dirty logging needs libatomic (apt-get install libatomic1)")
        if size <= 0 or offset < 0:
            raise VirtioError(f"dirty log of {size} bytes at offset {offset}")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & fcntl.F_SEAL_SHRINK:
            raise VirtioError(
                "the dirty log's file is not sealed against shrinking (F_SEAL_SHRINK)"
            )
        skip = offset % mmap.ALLOCATIONGRANULARITY
        try:
            if os.fstat(fd).st_size < offset + size:
                raise VirtioError(f"dirty log of {size} bytes at offset {offset} exceeds its file")
            self._map = mmap.mmap(fd, skip + size, offset=offset - skip)
        except (OSError, ValueError, OverflowError) as exc:
            raise VirtioError(f"cannot map the dirty log: {exc}") from None
        self._anchor = (ctypes.c_uint8 * size).from_buffer(self._map, skip)
        self._base = ctypes.addressof(self._anchor)
        self.size = size
        #: Guest memory the log covers: [0, limit).
        self.limit = size * 8 * LOG_PAGE

    def __repr__(self) -> str:
        return f"<DirtyLog {self.size} bytes, guest memory up to {self.limit:#x}>"

    def check(self, gpa: int, length: int, what: str) -> None:
        """VirtioError unless guest range [gpa, gpa+length) is covered by the log."""
        if gpa < 0 or gpa + length > self.limit:
            raise VirtioError(
                f"{what} at guest address {gpa:#x}+{length:#x} lies beyond the dirty log "
                f"(which covers up to {self.limit:#x})"
            )

    def mark(self, gpa: int, length: int) -> None:
        """Set the bits of the pages of guest range [gpa, gpa+length) (none if empty)."""
        if length <= 0:
            return
        first, last = gpa // LOG_PAGE, (gpa + length - 1) // LOG_PAGE
        if gpa < 0 or last >= self.size * 8:
            self.check(gpa, length, "a device write")
        fetch_or, base = _fetch_or, self._base
        assert fetch_or is not None
        for byte in range(first >> 3, (last >> 3) + 1):
            low = first - 8 * byte if byte == first >> 3 else 0
            high = last - 8 * byte if byte == last >> 3 else 7
            fetch_or(base + byte, (0xFF >> (7 - high + low)) << low, _SEQ_CST)

    def close(self) -> None:
        """Unmap the log (nobody may mark it any more)."""
        del self._anchor
        self._map.close()


def dirty_pages(log: bytes | bytearray | memoryview) -> list[int]:
    """The page numbers whose bits are set in `log` (the front-end's reading)."""
    data = bytes(log)
    return [
        8 * i + bit for i, byte in enumerate(data) if byte for bit in range(8) if byte >> bit & 1
    ]
