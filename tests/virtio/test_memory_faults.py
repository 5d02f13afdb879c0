"""A front-end that truncates its memfd after sending it must not kill us (SIGBUS guard).

These tests truncate guest memory under a live mapping and touch it in this very process:
without the guard, pytest itself dies of SIGBUS.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator

import pytest

from vdev.virtio.errors import GuestMemoryError
from vdev.virtio.memory import GuestMemory

PAGE = mmap.PAGESIZE


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("vdev-fault-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 8 * PAGE)
    yield fd
    os.close(fd)


def test_truncated_memory_reads_zeros_and_records_the_fault(memfd: int) -> None:
    reports: list[str] = []
    with GuestMemory() as mem:
        mem.on_fault = reports.append
        mem.add_region(0x10000, 8 * PAGE, 0x7000_0000, 0, memfd)
        mem.gpa_view(0x10000, 5)[:] = b"alive"
        mem.gpa_view(0x10000 + 3 * PAGE, 4)[:] = b"gone"
        mem.check()
        assert mem.fault is None

        os.ftruncate(memfd, PAGE)
        assert bytes(mem.gpa_view(0x10000 + 3 * PAGE, 4)) == bytes(4)  # read past EOF
        mem.vva_view(0x7000_0000 + 5 * PAGE, 3)[:] = b"lost"[:3]  # write past EOF
        assert bytes(mem.vva_view(0x7000_0000 + 5 * PAGE, 3)) == b"los"  # a private page
        assert bytes(mem.gpa_view(0x10000, 5)) == b"alive"  # the file's page is still shared
        assert os.pread(memfd, 8, 5 * PAGE) == b""  # and the front-end's file is untouched

        assert mem.fault is not None and "region 0x10000+0x8000" in mem.fault
        for _ in range(2):
            with pytest.raises(GuestMemoryError, match="SIGBUS"):
                mem.check()
        assert reports == [mem.fault]  # once


def test_fault_on_another_thread(memfd: int) -> None:
    """SIGBUS is delivered to the faulting thread: queue workers are OS threads."""
    with GuestMemory() as mem:
        mem.add_region(0, 8 * PAGE, 0, 0, memfd)
        os.ftruncate(memfd, 0)
        results: dict[int, tuple[bytes, bytes]] = {}

        def worker(page: int) -> None:
            view = mem.gpa_view(page * PAGE, PAGE)
            before = bytes(view)
            view[:4] = b"used"
            results[page] = (before, bytes(view[:4]))

        threads = [threading.Thread(target=worker, args=(page,)) for page in (2, 6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == {2: (bytes(PAGE), b"used"), 6: (bytes(PAGE), b"used")}
        with pytest.raises(GuestMemoryError):
            mem.check()


def test_fault_in_code_that_released_the_gil(memfd: int) -> None:
    """zlib hashes large buffers without the GIL: the handler must take it."""
    with GuestMemory() as mem:
        mem.add_region(0, 8 * PAGE, 0, 0, memfd)
        os.ftruncate(memfd, 0)
        crcs: list[int] = []
        thread = threading.Thread(target=lambda: crcs.append(zlib.crc32(mem.gpa_view(0, 8 * PAGE))))
        thread.start()
        thread.join()
        assert crcs == [zlib.crc32(bytes(8 * PAGE))]
        assert mem.fault is not None


def test_a_fault_is_recorded_on_its_own_memory(memfd: int) -> None:
    other_fd = os.memfd_create("vdev-fault-other", os.MFD_CLOEXEC)
    try:
        os.ftruncate(other_fd, PAGE)
        with GuestMemory() as hit, GuestMemory() as spared:
            hit.add_region(0, 8 * PAGE, 0, 0, memfd)
            spared.add_region(0, PAGE, 0, 0, other_fd)
            os.ftruncate(memfd, 0)
            assert bytes(hit.gpa_view(PAGE, 8)) == bytes(8)
            assert hit.fault is not None
            assert spared.fault is None
            spared.check()
    finally:
        os.close(other_fd)


def test_seals_are_noted(memfd: int) -> None:
    with GuestMemory() as mem:
        mem.add_region(0, PAGE, 0, 0, memfd)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        mem.add_region(PAGE, PAGE, PAGE, PAGE, memfd)
        assert [r.sealed for r in mem.regions] == [False, True]
        with pytest.raises(PermissionError):
            os.ftruncate(memfd, 0)  # what the seal buys: the file cannot shrink


_OUTSIDE_GUEST_MEMORY = """
import mmap, os, signal, sys
from vdev.virtio.memory import GuestMemory

guest = os.memfd_create("guest")
os.ftruncate(guest, mmap.PAGESIZE)
mem = GuestMemory()
mem.add_region(0, mmap.PAGESIZE, 0, 0, guest)
os.ftruncate(guest, 0)
assert bytes(mem.gpa_view(0, 1)) == b"\\0" and mem.fault  # the guard is on
print("guarded", flush=True)

if sys.argv[1] == "fault":
    other = os.memfd_create("not-guest")
    os.ftruncate(other, mmap.PAGESIZE)
    plain = mmap.mmap(other, mmap.PAGESIZE)
    os.ftruncate(other, 0)
    plain[0]
else:
    os.kill(os.getpid(), signal.SIGBUS)
print("survived", flush=True)
"""


@pytest.mark.parametrize("how", ["fault", "kill"])
@pytest.mark.parametrize("faulthandler", [False, True])
def test_sigbus_outside_guest_memory_still_kills(how: str, faulthandler: bool) -> None:
    """The guard must not swallow real bugs: they end as before, via the previous action."""
    flags = ["-X", "faulthandler"] if faulthandler else []
    proc = subprocess.run(
        [sys.executable, *flags, "-c", _OUTSIDE_GUEST_MEMORY, how],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout == "guarded\n"
    assert proc.returncode == -signal.SIGBUS
    assert ("Fatal Python error: Bus error" in proc.stderr) == faulthandler
