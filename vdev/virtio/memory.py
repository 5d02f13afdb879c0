"""Guest memory: the regions the front-end shares with us, and bounds-checked views of them.

Addresses come in two kinds. Descriptors carry guest physical addresses (GPA);
vhost-user ring addresses (SET_VRING_ADDR) are front-end virtual addresses (user
addresses, VVA). Every lookup is bounds-checked and returns memoryviews straight into
the mapping (zero copy), or raises `GuestMemoryError`.

Lifetime: an mmap cannot be unmapped while memoryviews of it exist (Python refuses with
BufferError, which also makes a use-after-unmap impossible). Callers must drop the
views they got (chains, ring views) before `remove_region`/`clear`/`close` for the
memory to be unmapped at once; otherwise those calls still succeed, log, and the
mapping goes away when its last view does.

Mutations (add, remove, clear) replace an immutable lookup table, so threads that look
up addresses concurrently see either the old or the new table, never a half-built one.

Faults: a front-end may shrink a file after sending it, and touching guest memory past
its new end raises SIGBUS. Regions mapped from files are registered with
`vdev.virtio.faults`, whose handler turns such a fault into zeros read and writes lost,
and records it: `fault` describes the first one, `check` raises it as GuestMemoryError,
and `on_fault` lets the session hear of it (see `check`). The memory of that session can
no longer be trusted; the daemon lives on.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import logging
import mmap
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vdev.virtio import faults
from vdev.virtio.errors import GuestMemoryError

logger = logging.getLogger(__name__)

_ADDRESS_LIMIT = 1 << 64
_MAP_NORESERVE = 0x4000  # Linux; Python's mmap module lacks it


@dataclass(frozen=True, eq=False)
class MemoryRegion:
    """One contiguous piece of guest memory and where it is mapped in this process."""

    guest_phys_addr: int
    size: int
    #: Where the front-end has this region in its own address space.
    user_addr: int
    #: Offset of the region in the file `fd` refers to.
    mmap_offset: int
    #: A dup of the front-end's fd, owned by the `GuestMemory` (None for plain buffers);
    #: the only fd the region keeps (a driver domain passes it on to its child).
    fd: int | None
    #: The region's bytes.
    view: memoryview = field(repr=False)
    #: The mmap that owns the address range `view` slices (None for plain buffers).
    mapping: mmap.mmap | None = field(repr=False)
    #: Address of the region's first byte in this process.
    host_addr: int = field(repr=False)
    #: The file cannot shrink under us (a memfd sealed with F_SEAL_SHRINK).
    sealed: bool = False

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.size

    @property
    def user_end(self) -> int:
        return self.user_addr + self.size


@dataclass(frozen=True)
class _Table:
    """Regions sorted by guest address and by user address, with bisect keys."""

    by_gpa: tuple[MemoryRegion, ...] = ()
    gpa_starts: tuple[int, ...] = ()
    by_user: tuple[MemoryRegion, ...] = ()
    user_starts: tuple[int, ...] = ()

    @classmethod
    def build(cls, regions: Sequence[MemoryRegion]) -> _Table:
        by_gpa = tuple(sorted(regions, key=lambda r: r.guest_phys_addr))
        by_user = tuple(sorted(regions, key=lambda r: r.user_addr))
        return cls(
            by_gpa,
            tuple(r.guest_phys_addr for r in by_gpa),
            by_user,
            tuple(r.user_addr for r in by_user),
        )

    def find_gpa(self, gpa: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self.gpa_starts, gpa) - 1
        if i >= 0 and gpa < self.by_gpa[i].gpa_end:
            return self.by_gpa[i]
        return None

    def find_user(self, uaddr: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self.user_starts, uaddr) - 1
        if i >= 0 and uaddr < self.by_user[i].user_end:
            return self.by_user[i]
        return None


def _buffer_address(view: memoryview) -> int:
    """Address of the first byte of a writable, contiguous buffer."""
    return ctypes.addressof((ctypes.c_char * view.nbytes).from_buffer(view))


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _page_size(st: os.stat_result) -> int:
    """Granularity of a file's mappings: hugetlbfs reports its huge page size as st_blksize.

    A larger block size of another file system only makes the mapping coarser-aligned.
    """
    size = st.st_blksize
    return size if size > mmap.PAGESIZE and not size & (size - 1) else mmap.PAGESIZE


def _shrink_sealed(fd: int) -> bool:
    """Whether the file cannot be truncated under us: a memfd with F_SEAL_SHRINK."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:  # EINVAL: not a memfd, no seals
        return False


def _map_file(fd: int, offset: int, length: int, page: int) -> tuple[mmap.mmap, int]:
    """Map [offset, offset+length) of `fd` shared: (the owner mmap, where in it).

    Python's mmap would keep a dup of `fd` for the mapping's life, a second fd per
    region. Instead an anonymous mmap reserves the range (it also gives views their
    lifetime tracking, and unmaps it all when closed) and the file is mapped over it
    with MAP_FIXED at a `page` aligned address (hugetlbfs needs that).
    """
    reserve = mmap.mmap(-1, length + page - mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)
    base = _buffer_address(memoryview(reserve))
    start = _round_up(base, page)
    try:
        faults.map_fixed(start, length, mmap.MAP_SHARED, fd, offset)
    except OSError:
        reserve.close()
        raise
    return reserve, start - base


def _slice(region: MemoryRegion, offset: int, length: int) -> memoryview:
    try:
        return region.view[offset : offset + length]
    except ValueError as exc:  # released by a concurrent remove_region/clear
        raise GuestMemoryError(
            f"region at guest address {region.guest_phys_addr:#x} was removed"
        ) from exc


class GuestMemory:
    """The guest memory table of one front-end connection."""

    def __init__(self) -> None:
        self._table = _Table()
        self._faults = faults.FaultRecord()
        self._fault_lock = threading.Lock()
        self._fault_reported = False
        #: Called once, with `fault`, by the first `check` that finds one (on its thread).
        self.on_fault: Callable[[str], None] | None = None

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def regions(self) -> Sequence[MemoryRegion]:
        """The current regions, by guest address (indices as used by `locate`)."""
        return self._table.by_gpa

    # --- building the table ----------------------------------------------------------

    def add_region(
        self, guest_phys_addr: int, size: int, user_addr: int, mmap_offset: int, fd: int
    ) -> None:
        """Map `size` bytes of `fd` from `mmap_offset` (SET_MEM_TABLE / ADD_MEM_REG entry).

        The caller keeps ownership of `fd`; the region keeps one dup of it, the mapping
        none. The file must be large enough now; should it shrink later, the region's
        SIGBUS guard catches the faults (see the module docstring).
        """
        self._check_new(guest_phys_addr, size, user_addr)
        if mmap_offset < 0:
            raise GuestMemoryError(f"negative mmap offset {mmap_offset:#x}")
        name = f"region {guest_phys_addr:#x}+{size:#x}"
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size < mmap_offset + size:
                # Touching pages past the end of the file would SIGBUS.
                raise GuestMemoryError(
                    f"{name} at offset {mmap_offset:#x} exceeds its file ({st.st_size:#x} bytes)"
                )
            page = _page_size(st)
            skip = mmap_offset % page
            length = _round_up(skip + size, page)
            mapping, start = _map_file(fd, mmap_offset - skip, length, page)
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(f"cannot map {name} from fd {fd}: {exc}") from exc
        try:
            dup = os.dup(fd)
        except OSError as exc:
            mapping.close()
            raise GuestMemoryError(f"cannot keep fd {fd}: {exc}") from exc
        sealed = _shrink_sealed(fd)
        if not sealed:
            logger.debug("%s: its file can shrink (no F_SEAL_SHRINK); faults are caught", name)
        view = memoryview(mapping)[start + skip : start + skip + size]
        address = _buffer_address(view)
        guarded = faults.GuardedRange(address - skip, length, page, mmap_offset - skip, name)
        faults.guard(mapping, guarded, self._faults)
        self._insert(
            MemoryRegion(
                guest_phys_addr, size, user_addr, mmap_offset, dup, view, mapping, address, sealed
            )
        )

    def add_buffer(
        self,
        guest_phys_addr: int,
        buf: bytearray | memoryview | mmap.mmap,
        user_addr: int | None = None,
    ) -> None:
        """Use a writable buffer (bytearray, anonymous mmap...) as guest memory, for tests."""
        try:
            view = memoryview(buf).cast("B")
        except TypeError as exc:
            raise GuestMemoryError(f"not a contiguous buffer: {exc}") from exc
        if view.readonly:
            raise GuestMemoryError("guest memory must be writable")
        uaddr = guest_phys_addr if user_addr is None else user_addr
        self._check_new(guest_phys_addr, len(view), uaddr)
        self._insert(
            MemoryRegion(
                guest_phys_addr, len(view), uaddr, 0, None, view, None, _buffer_address(view)
            )
        )

    def remove_region(self, guest_phys_addr: int, size: int, user_addr: int) -> None:
        """Unmap the region with exactly these guest address, size and user address."""
        regions = self._table.by_gpa
        key = (guest_phys_addr, size, user_addr)
        for region in regions:
            if (region.guest_phys_addr, region.size, region.user_addr) == key:
                self._table = _Table.build([r for r in regions if r is not region])
                self._release(region)
                return
        raise GuestMemoryError(
            f"no region {guest_phys_addr:#x}+{size:#x} at user address {user_addr:#x}"
        )

    def clear(self) -> None:
        """Unmap every region (SET_MEM_TABLE replaces the whole table)."""
        regions, self._table = self._table.by_gpa, _Table()
        for region in regions:
            self._release(region)

    def close(self) -> None:
        """Release everything; the object stays usable (an empty table)."""
        self.clear()

    def _insert(self, region: MemoryRegion) -> None:
        self._table = _Table.build((*self._table.by_gpa, region))
        logger.debug("added %s", region)

    def _check_new(self, gpa: int, size: int, uaddr: int) -> None:
        if size <= 0:
            raise GuestMemoryError(f"region at {gpa:#x} has size {size}")
        if gpa < 0 or uaddr < 0 or gpa + size > _ADDRESS_LIMIT or uaddr + size > _ADDRESS_LIMIT:
            raise GuestMemoryError(f"region {gpa:#x}+{size:#x} does not fit 64-bit addresses")
        for r in self._table.by_gpa:
            if gpa < r.gpa_end and r.guest_phys_addr < gpa + size:
                raise GuestMemoryError(
                    f"region {gpa:#x}+{size:#x} overlaps {r.guest_phys_addr:#x}+{r.size:#x}"
                )
            if uaddr < r.user_end and r.user_addr < uaddr + size:
                raise GuestMemoryError(
                    f"region at user address {uaddr:#x}+{size:#x} overlaps "
                    f"{r.user_addr:#x}+{r.size:#x}"
                )

    @staticmethod
    def _release(region: MemoryRegion) -> None:
        """Drop a region: unmap it now if no view of it is left, else when the last goes."""
        if region.fd is not None:
            try:
                os.close(region.fd)
            except OSError as exc:
                logger.warning("closing the fd of region %s: %s", region, exc)
        try:
            region.view.release()
            if region.mapping is not None:
                region.mapping.close()
        except BufferError:
            logger.info(
                "region %#x+%#x still has views in use; it is unmapped when they are dropped",
                region.guest_phys_addr,
                region.size,
            )
        else:
            logger.debug("unmapped %s", region)

    # --- faults ----------------------------------------------------------------------

    @property
    def fault(self) -> str | None:
        """What the first SIGBUS on this memory hit (None if none did). It stays set:
        once a file shrank under us, nothing read from this memory can be trusted."""
        address, where = self._faults.address, self._faults.where
        if address is None or where is None:
            return None
        return (
            f"guest memory fault (SIGBUS) at file offset {where.file_offset(address):#x} "
            f"of {where.label}: the front-end shrank its memory file"
        )

    def check(self) -> None:
        """Raise GuestMemoryError if this memory faulted (cheap: call it after each batch).

        The first call that finds the fault calls `on_fault` with its description, once
        for all threads, before raising: the server's way to end the session (from a
        worker thread: thread-safe, not raising; e.g. `trio.lowlevel.TrioToken.run_sync_soon`).
        Data read since the fault may be zeros and data written lost: fail whatever the
        batch produced.
        """
        message = self.fault
        if message is None:
            return
        with self._fault_lock:
            report, self._fault_reported = not self._fault_reported, True
        if report and self.on_fault is not None:
            self.on_fault(message)
        raise GuestMemoryError(message)

    # --- lookups ---------------------------------------------------------------------

    def gpa_views(self, gpa: int, length: int) -> list[memoryview]:
        """Views of guest range [gpa, gpa+length), split where it crosses adjacent regions."""
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        if not length:
            return []
        table = self._table
        i = bisect.bisect_right(table.gpa_starts, gpa) - 1
        if i >= 0:  # the usual case first: the range lies in one region
            region = table.by_gpa[i]
            offset = gpa - region.guest_phys_addr
            if offset + length <= region.size:
                try:
                    return [region.view[offset : offset + length]]
                except ValueError:  # released: fall through to the loop, which says so
                    pass
        views: list[memoryview] = []
        addr, left = gpa, length
        while left:
            region = table.find_gpa(addr)
            if region is None:
                raise GuestMemoryError(
                    f"guest range {gpa:#x}+{length:#x} is not mapped (hole at {addr:#x})"
                )
            offset = addr - region.guest_phys_addr
            n = min(left, region.size - offset)
            views.append(_slice(region, offset, n))
            addr += n
            left -= n
        return views

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """A view of guest range [gpa, gpa+length), which must lie in one region."""
        region = self._table.find_gpa(gpa)
        if region is None or length < 0 or gpa + length > region.gpa_end:
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{length:#x} is not within one mapped region"
            )
        return _slice(region, gpa - region.guest_phys_addr, length)

    def vva_view(self, uaddr: int, length: int) -> memoryview:
        """A view of front-end user range [uaddr, uaddr+length) (ring areas)."""
        region = self._table.find_user(uaddr)
        if region is None or length < 0 or uaddr + length > region.user_end:
            raise GuestMemoryError(
                f"front-end range {uaddr:#x}+{length:#x} is not within one mapped region"
            )
        return _slice(region, uaddr - region.user_addr, length)

    def user_to_gpa(self, uaddr: int) -> int:
        """The guest address of front-end user address `uaddr`."""
        region = self._table.find_user(uaddr)
        if region is None:
            raise GuestMemoryError(f"front-end address {uaddr:#x} is not mapped")
        return region.guest_phys_addr + uaddr - region.user_addr

    def locate(self, view: memoryview) -> tuple[int, int]:
        """(index in `regions`, offset in that region) of a view into our memory.

        Lets a driver domain that maps the regions itself receive references instead of
        data. Indices are only valid until the table changes.
        """
        try:
            addr = _buffer_address(view)
        except (TypeError, ValueError) as exc:
            raise GuestMemoryError(f"not a writable contiguous buffer: {exc}") from exc
        for i, region in enumerate(self._table.by_gpa):
            offset = addr - region.host_addr
            if offset >= 0 and offset + view.nbytes <= region.size:
                return i, offset
        raise GuestMemoryError("view does not point into guest memory")
