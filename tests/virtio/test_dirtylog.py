"""The dirty log's bitmap: which bits a mark sets, and which logs are refused."""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Iterator

import pytest

from vdev.virtio.dirtylog import LOG_PAGE, DirtyLog, dirty_pages
from vdev.virtio.errors import VirtioError

SIZE = 64  # bytes: 512 pages, 2 MiB of guest memory


@pytest.fixture
def log_fd() -> Iterator[int]:
    fd = os.memfd_create("log", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    yield fd
    os.close(fd)


@pytest.mark.parametrize(
    ("gpa", "length", "pages"),
    [
        (0, 1, [0]),
        (LOG_PAGE - 1, 2, [0, 1]),  # a 2-byte store across a page boundary
        (5 * LOG_PAGE, 3 * LOG_PAGE, [5, 6, 7]),
        (7 * LOG_PAGE + 100, 10 * LOG_PAGE, list(range(7, 18))),  # across three bytes
        (511 * LOG_PAGE, LOG_PAGE, [511]),  # the last page the log covers
        (3 * LOG_PAGE, 0, []),
    ],
)
def test_mark_sets_the_bit_of_every_page_touched(log_fd, gpa, length, pages) -> None:
    log = DirtyLog(log_fd, SIZE)
    log.mark(gpa, length)
    with mmap.mmap(log_fd, SIZE) as shared:  # what the front-end sees
        assert dirty_pages(shared[:]) == pages
    log.close()


def test_marks_accumulate_and_keep_what_the_front_end_left(log_fd) -> None:
    with mmap.mmap(log_fd, SIZE) as shared:
        shared[0] = 0b1000_0001  # pages 0 and 7, set by another back-end
        log = DirtyLog(log_fd, SIZE)
        log.mark(2 * LOG_PAGE, 1)
        log.mark(2 * LOG_PAGE, 1)
        assert dirty_pages(shared[:]) == [0, 2, 7]
    log.close()


def test_an_offset_into_the_file(log_fd) -> None:
    log = DirtyLog(log_fd, 16, offset=48)
    log.mark(0, 1)
    with mmap.mmap(log_fd, SIZE) as shared:
        assert dirty_pages(shared[:]) == [48 * 8]
    log.close()


def test_a_write_beyond_the_log_is_an_error(log_fd) -> None:
    log = DirtyLog(log_fd, SIZE)
    with pytest.raises(VirtioError, match="beyond the dirty log"):
        log.mark(512 * LOG_PAGE - 1, 2)
    log.close()


def test_logs_that_could_shrink_or_do_not_fit_are_refused(log_fd) -> None:
    unsealed = os.memfd_create("log")
    os.ftruncate(unsealed, SIZE)
    try:
        with pytest.raises(VirtioError, match="not sealed against shrinking"):
            DirtyLog(unsealed, SIZE)
    finally:
        os.close(unsealed)
    with pytest.raises(VirtioError, match="exceeds its file"):
        DirtyLog(log_fd, SIZE, offset=8)
    with pytest.raises(VirtioError, match="dirty log of 0 bytes"):
        DirtyLog(log_fd, 0)
