"""A disk that reads zeros and drops writes: measures the data path, not the storage."""

from __future__ import annotations

from collections.abc import Sequence

from vdev.backend import BlockBackend, block_size_option, size_option

SECTOR_SIZE = 512
_ZEROS = memoryview(bytes(1 << 16))


def fill_zeros(buffers: Sequence[memoryview]) -> None:
    """Zero every byte of `buffers`."""
    for buf in buffers:
        for start in range(0, buf.nbytes, _ZEROS.nbytes):
            chunk = buf[start : start + _ZEROS.nbytes]
            chunk[:] = _ZEROS[: chunk.nbytes]


class NullBackend(BlockBackend):
    """`size` bytes of nothing: reads return zeros, writes and discards succeed."""

    def __init__(self, size: int | str, serial: str = "", block_size: int | str = 512) -> None:
        self.size = size_option("size", size, multiple_of=SECTOR_SIZE)
        self.serial = serial
        self.block_size = block_size_option(block_size, self.size)

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        fill_zeros(buffers)

    def write(self, offset: int, buffers: Sequence[memoryview]) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        pass
