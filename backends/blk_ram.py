"""A disk in anonymous memory: pages are allocated when first written, freed on discard."""

from __future__ import annotations

import errno
import mmap
import threading
from collections.abc import Sequence

from vdev_backends.blk_null import SECTOR_SIZE, fill_zeros

from vdev.backend import BackendError, BlockBackend, block_size_option, size_option

#: Resizing copies the old contents over in chunks of this size, skipping zero ones.
_COPY_CHUNK = 1 << 20


def _anonymous_map(size: int) -> mmap.mmap:
    try:
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, OverflowError) as exc:
        raise BackendError(f"size: cannot map {size} bytes of memory ({exc})") from None


def _past_the_end() -> OSError:
    return OSError(errno.EIO, "past the end of the disk (resized meanwhile)")


class RamBackend(BlockBackend):
    """`size` bytes of private anonymous memory (lost when the daemon stops).

    `resize` moves the contents to a new mapping; a reader still holding the old one
    reads the old contents (writes wait for the move), and the old mapping goes away
    with the last view into it.
    """

    def __init__(self, size: int | str, serial: str = "", block_size: int | str = 512) -> None:
        self.size = size_option("size", size, multiple_of=SECTOR_SIZE)
        self.serial = serial
        self.block_size = block_size_option(block_size, self.size)
        self._map = _anonymous_map(self.size)
        self._view = memoryview(self._map)
        #: Held by writes and by a resize's move.
        self._lock = threading.Lock()

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        view = self._view
        limit = view.nbytes
        for buf in buffers:
            end = offset + buf.nbytes
            if end > limit:
                raise _past_the_end()
            buf[:] = view[offset:end]
            offset = end

    def write(self, offset: int, buffers: Sequence[memoryview]) -> None:
        with self._lock:
            view = self._view
            limit = view.nbytes
            for buf in buffers:
                end = offset + buf.nbytes
                if end > limit:
                    raise _past_the_end()
                view[offset:end] = buf
                offset = end

    def resize(self, size: int) -> None:
        new_map = _anonymous_map(size)
        new_view = memoryview(new_map)
        with self._lock:
            old = self._view
            keep = min(old.nbytes, size)
            for start in range(0, keep, _COPY_CHUNK):
                data = old[start : min(start + _COPY_CHUNK, keep)].tobytes()
                if data.count(0) != len(data):  # untouched pages stay unallocated
                    new_view[start : start + len(data)] = data
            self._map, self._view, self.size = new_map, new_view, size

    def discard(self, offset: int, length: int) -> None:
        self._release(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._release(offset, length)

    def _release(self, offset: int, length: int) -> None:
        """Zero a range: whole pages are given back to the kernel, partial ones cleared."""
        end = offset + length
        first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        with self._lock:
            view = self._view
            if end > view.nbytes:
                raise _past_the_end()
            if first >= last:
                fill_zeros([view[offset:end]])
                return
            fill_zeros([view[offset:first], view[last:end]])
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        self._view.release()
        self._map.close()
