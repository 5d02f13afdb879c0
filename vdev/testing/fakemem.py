"""Fake guest memory for tests: a real `GuestMemory` plus a driver-side allocator.

The memory is one block of guest addresses cut into equal, adjacent regions (several
regions exercise buffers that span them). By default a region's user address equals
its guest address, so ring addresses and descriptor addresses coincide. With
``memfd=True`` the regions are slices of one memfd, as QEMU's memory-backend-memfd
gives them, so that a fake front-end can send them to a back-end over a socket
(``region.fd``, ``region.mmap_offset``...).
"""

from __future__ import annotations

import mmap
import os
from collections import defaultdict

from vdev.virtio.errors import GuestMemoryError
from vdev.virtio.memory import GuestMemory


class FakeGuestMemory(GuestMemory):
    """Guest memory for tests, with `alloc`/`free` and byte-level `read`/`write`.

    Allocations never straddle a region boundary (ring areas must not), and freed
    blocks are reused for allocations of the same size and alignment, so long tests
    that allocate and free buffers of a few sizes run in constant memory.
    """

    def __init__(
        self,
        size: int = 1 << 20,
        *,
        base: int = 0x10_0000,
        regions: int = 1,
        memfd: bool = False,
        user_offset: int = 0,
    ) -> None:
        super().__init__()
        if regions < 1 or size <= 0 or size % (regions * mmap.PAGESIZE):
            raise ValueError(f"size {size:#x} is not a multiple of {regions} pages")
        self.base = base
        self.end = base + size
        self.region_size = size // regions
        starts = [base + i * self.region_size for i in range(regions)]
        if memfd:
            fd = os.memfd_create("vdev-fake-guest", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                for start in starts:
                    self.add_region(start, self.region_size, start + user_offset, start - base, fd)
            finally:
                os.close(fd)
        else:
            for start in starts:
                self.add_buffer(start, bytearray(self.region_size), start + user_offset)
        self._next = base
        self._allocated: dict[int, tuple[int, int]] = {}
        self._free: defaultdict[tuple[int, int], list[int]] = defaultdict(list)

    def alloc(self, size: int, align: int = 16) -> int:
        """Reserve `size` bytes aligned to `align` (a power of 2) in one region; the gpa."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation of {size} bytes aligned to {align}")
        if size > self.region_size:
            raise ValueError(f"{size} bytes do not fit in a region of {self.region_size}")
        reuse = self._free[size, align]
        if reuse:
            gpa = reuse.pop()
        else:
            gpa = _align_up(self._next, align)
            region_end = self.base + ((gpa - self.base) // self.region_size + 1) * self.region_size
            if gpa + size > region_end:
                gpa = _align_up(region_end, align)
            if gpa + size > self.end:
                raise MemoryError(f"fake guest memory exhausted ({size} bytes wanted)")
            self._next = gpa + size
        self._allocated[gpa] = (size, align)
        return gpa

    def free(self, gpa: int) -> None:
        """Give back a block from `alloc`."""
        try:
            key = self._allocated.pop(gpa)
        except KeyError:
            raise ValueError(f"{gpa:#x} was not allocated") from None
        self._free[key].append(gpa)

    def read(self, gpa: int, length: int) -> bytes:
        """Copy guest bytes out (across adjacent regions)."""
        return b"".join(self.gpa_views(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy bytes into guest memory (across adjacent regions)."""
        src = memoryview(data).cast("B")
        done = 0
        for view in self.gpa_views(gpa, src.nbytes):
            view[:] = src[done : done + view.nbytes]
            done += view.nbytes

    def user_addr(self, gpa: int) -> int:
        """The front-end user address of guest address `gpa` (what SET_VRING_ADDR wants)."""
        for region in self.regions:
            if region.guest_phys_addr <= gpa < region.gpa_end:
                return region.user_addr + (gpa - region.guest_phys_addr)
        raise GuestMemoryError(f"guest address {gpa:#x} is not mapped")


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)
