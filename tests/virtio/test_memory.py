"""GuestMemory: mapping, bounds checks, region table changes, locate."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest

from vdev.testing.fakemem import FakeGuestMemory
from vdev.virtio.errors import GuestMemoryError
from vdev.virtio.memory import GuestMemory, _slice

PAGE = mmap.PAGESIZE


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("vdev-test")
    os.ftruncate(fd, 4 * PAGE)
    yield fd
    os.close(fd)


def test_buffer_views_are_zero_copy() -> None:
    buf = bytearray(PAGE)
    mem = GuestMemory()
    mem.add_buffer(0x1000, buf)
    mem.gpa_view(0x1010, 4)[:] = b"abcd"
    assert buf[0x10:0x14] == b"abcd"
    assert bytes(mem.vva_view(0x1010, 4)) == b"abcd"  # user address == gpa by default


def test_user_addresses_are_separate() -> None:
    mem = GuestMemory()
    mem.add_buffer(0x1000, bytearray(PAGE), user_addr=0x7F00_0000)
    mem.gpa_view(0x1000, 2)[:] = b"hi"
    assert bytes(mem.vva_view(0x7F00_0000, 2)) == b"hi"
    with pytest.raises(GuestMemoryError):
        mem.vva_view(0x1000, 2)
    with pytest.raises(GuestMemoryError):
        mem.gpa_view(0x7F00_0000, 2)


def test_bounds() -> None:
    mem = GuestMemory()
    mem.add_buffer(0x1000, bytearray(PAGE))
    assert len(mem.gpa_view(0x1000, PAGE)) == PAGE
    for gpa, length in [(0x1000, PAGE + 1), (0xFFF, 1), (0x2000, 1), (0x1000, -1), (-1, 1)]:
        with pytest.raises(GuestMemoryError):
            mem.gpa_view(gpa, length)
        with pytest.raises(GuestMemoryError):
            mem.gpa_views(gpa, length)
    assert mem.gpa_views(0x5000, 0) == []


def test_views_span_adjacent_regions_but_not_holes() -> None:
    mem = GuestMemory()
    mem.add_buffer(0x1000, bytearray(b"a" * PAGE))
    mem.add_buffer(0x2000, bytearray(b"b" * PAGE))
    mem.add_buffer(0x4000, bytearray(b"c" * PAGE))  # hole at 0x3000
    views = mem.gpa_views(0x1FFE, 4)
    assert [bytes(v) for v in views] == [b"aa", b"bb"]
    with pytest.raises(GuestMemoryError, match="one mapped region"):
        mem.gpa_view(0x1FFE, 4)
    with pytest.raises(GuestMemoryError, match="hole at 0x3000"):
        mem.gpa_views(0x2FFE, 4)
    with pytest.raises(GuestMemoryError):
        mem.gpa_views(0x3FFE, 4)


@pytest.mark.parametrize(
    ("gpa", "size", "uaddr"),
    [(0x1800, PAGE, 0x9000), (0x0800, PAGE, 0x9000), (0x9000, PAGE, 0x1800), (0x9000, 0, 0xA000)],
)
def test_overlapping_or_empty_regions_are_refused(gpa: int, size: int, uaddr: int) -> None:
    mem = GuestMemory()
    mem.add_buffer(0x1000, bytearray(PAGE))
    with pytest.raises(GuestMemoryError):
        mem.add_buffer(gpa, bytearray(size), user_addr=uaddr)
    assert len(mem.regions) == 1


def test_read_only_buffer_is_refused() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory().add_buffer(0, b"\0" * PAGE)


def test_memfd_region_is_shared_and_sliced_at_unaligned_offset(memfd: int) -> None:
    with GuestMemory() as mem:
        mem.add_region(0x10000, PAGE, 0x7000_0000, 0x100, memfd)
        mem.gpa_view(0x10000, 5)[:] = b"hello"
        assert os.pread(memfd, 5, 0x100) == b"hello"
        os.pwrite(memfd, b"world", 0x105)
        assert bytes(mem.vva_view(0x7000_0005, 5)) == b"world"
        region = mem.regions[0]
        assert region.fd is not None and region.fd != memfd
        assert (region.mmap_offset, region.size) == (0x100, PAGE)


def test_region_keeps_its_own_fd(memfd: int) -> None:
    mem = GuestMemory()
    mem.add_region(0, 2 * PAGE, 0, 0, memfd)
    dup = mem.regions[0].fd
    assert dup is not None
    os.fstat(dup)
    mem.clear()
    with pytest.raises(OSError):
        os.fstat(dup)
    os.fstat(memfd)  # the caller's fd is untouched


def test_each_region_keeps_at_most_one_fd(memfd: int) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    with GuestMemory() as mem:
        for i in range(4):
            mem.add_region(i * PAGE, PAGE, i * PAGE, i * PAGE, memfd)
            assert open_fds() <= before + i + 1
        assert all(r.fd is not None for r in mem.regions)  # a driver domain passes them on
    assert open_fds() == before


def test_region_larger_than_its_file_is_refused(memfd: int) -> None:
    mem = GuestMemory()
    with pytest.raises(GuestMemoryError, match="exceeds its file"):
        mem.add_region(0, 4 * PAGE, 0, PAGE, memfd)
    assert not mem.regions


def test_unmappable_fd_is_refused() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(GuestMemoryError):
            GuestMemory().add_region(0, PAGE, 0, 0, r)
    finally:
        os.close(r)
        os.close(w)


def test_remove_region(memfd: int) -> None:
    mem = GuestMemory()
    mem.add_region(0, PAGE, 0x10_0000, 0, memfd)
    mem.add_region(PAGE, PAGE, 0x20_0000, PAGE, memfd)
    with pytest.raises(GuestMemoryError):
        mem.remove_region(0, PAGE, 0x20_0000)  # user address does not match
    mem.remove_region(0, PAGE, 0x10_0000)
    assert [r.guest_phys_addr for r in mem.regions] == [PAGE]
    with pytest.raises(GuestMemoryError):
        mem.gpa_view(0, 1)
    mem.gpa_view(PAGE, 1)


def test_clear_with_views_in_use_keeps_them_valid(
    memfd: int, caplog: pytest.LogCaptureFixture
) -> None:
    mem = GuestMemory()
    mem.add_region(0, PAGE, 0, 0, memfd)
    mem.add_buffer(0x10_0000, bytearray(PAGE))
    kept = mem.gpa_view(0x10, 4)
    caplog.set_level("INFO", logger="vdev.virtio.memory")
    mem.clear()  # must not raise although `kept` pins the mapping
    assert "still has views in use" in caplog.text
    kept[:] = b"live"
    assert os.pread(memfd, 4, 0x10) == b"live"
    with pytest.raises(GuestMemoryError):
        mem.gpa_view(0x10, 4)
    mem.close()


def test_removed_region_slices_fail_cleanly() -> None:
    """A lookup racing with removal gets GuestMemoryError, not ValueError."""
    mem = GuestMemory()
    mem.add_buffer(0, bytearray(PAGE))
    region = mem.regions[0]
    mem.clear()
    with pytest.raises(GuestMemoryError, match="was removed"):
        _slice(region, 0, 1)


def test_locate() -> None:
    mem = FakeGuestMemory(4 * PAGE, base=0x10_0000, regions=2)
    assert mem.locate(mem.gpa_view(0x10_0010, 8)) == (0, 0x10)
    assert mem.locate(mem.gpa_view(0x10_0000 + 3 * PAGE, 8)) == (1, PAGE)
    [first, second] = mem.gpa_views(0x10_0000 + 2 * PAGE - 4, 8)
    assert mem.locate(first) == (0, 2 * PAGE - 4)
    assert mem.locate(second) == (1, 0)
    with pytest.raises(GuestMemoryError):
        mem.locate(memoryview(bytearray(16)))
    with pytest.raises(GuestMemoryError):
        mem.locate(memoryview(b"read-only"))


def test_fake_memory_memfd_mode_shares_one_file() -> None:
    mem = FakeGuestMemory(4 * PAGE, base=0x4000_0000, regions=2, memfd=True, user_offset=0x1000)
    r0, r1 = mem.regions
    assert (r1.guest_phys_addr, r1.mmap_offset, r1.user_addr) == (
        0x4000_0000 + 2 * PAGE,
        2 * PAGE,
        0x4000_1000 + 2 * PAGE,
    )
    assert r0.fd is not None
    mem.write(0x4000_0000 + 2 * PAGE - 2, b"span")
    assert os.pread(r0.fd, 4, 2 * PAGE - 2) == b"span"
    assert mem.user_addr(0x4000_0010) == 0x4000_1010
    mem.close()


def test_fake_memory_allocator() -> None:
    mem = FakeGuestMemory(4 * PAGE, base=0x1000, regions=2)
    a = mem.alloc(100, 64)
    assert a % 64 == 0
    b = mem.alloc(2 * PAGE - 50)  # does not fit before the region boundary
    assert b == 0x1000 + 2 * PAGE
    mem.free(a)
    assert mem.alloc(100, 64) == a  # reused
    with pytest.raises(ValueError):
        mem.free(a + 1)
    with pytest.raises(MemoryError):
        mem.alloc(2 * PAGE)
