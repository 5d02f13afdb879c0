"""A disk in anonymous memory: pages are allocated when first written, freed on discard."""

from __future__ import annotations

import mmap
from collections.abc import Sequence

from vdev_backends.blk_null import SECTOR_SIZE, fill_zeros

from vdev.backend import BackendError, BlockBackend, block_size_option, size_option


class RamBackend(BlockBackend):
    """`size` bytes of private anonymous memory (lost when the daemon stops)."""

    def __init__(self, size: int | str, serial: str = "", block_size: int | str = 512) -> None:
        self.size = size_option("size", size, multiple_of=SECTOR_SIZE)
        self.serial = serial
        self.block_size = block_size_option(block_size, self.size)
        try:
            self._map = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, OverflowError) as exc:
            raise BackendError(f"size: cannot map {self.size} bytes of memory ({exc})") from None
        self._view = memoryview(self._map)

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        for buf in buffers:
            end = offset + buf.nbytes
            buf[:] = self._view[offset:end]
            offset = end

    def write(self, offset: int, buffers: Sequence[memoryview]) -> None:
        for buf in buffers:
            end = offset + buf.nbytes
            self._view[offset:end] = buf
            offset = end

    def discard(self, offset: int, length: int) -> None:
        self._release(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._release(offset, length)

    def _release(self, offset: int, length: int) -> None:
        """Zero a range: whole pages are given back to the kernel, partial ones cleared."""
        end = offset + length
        first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if first >= last:
            fill_zeros([self._view[offset:end]])
            return
        fill_zeros([self._view[offset:first], self._view[last:end]])
        self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        self._view.release()
        self._map.close()
