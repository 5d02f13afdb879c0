"""The built-in block backends on their own: file, ram, null."""

from __future__ import annotations

import errno
import mmap
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from vdev_backends import blk_file
from vdev_backends.blk_file import FileBackend
from vdev_backends.blk_null import NullBackend
from vdev_backends.blk_ram import RamBackend

from vdev.backend import BackendError, BlockBackend
from vdev.plugins import Kind, load

MiB = 1 << 20


def views(*sizes: int, fill: int = 0) -> list[memoryview]:
    return [memoryview(bytearray([fill]) * n) for n in sizes]


def joined(buffers: list[memoryview]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 16 MiB sparse image."""
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(16 * MiB)
    return path


@pytest.fixture(params=["file", "ram", "null"])
def backend(request: pytest.FixtureRequest, image: Path) -> Iterator[BlockBackend]:
    if request.param == "file":
        b: BlockBackend = FileBackend(image)
    elif request.param == "ram":
        b = RamBackend("16M")
    else:
        b = NullBackend(16 * MiB)
    yield b
    b.close()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# --- contract common to all three ------------------------------------------------------


def test_size_and_capabilities(backend: BlockBackend) -> None:
    assert backend.size == 16 * MiB
    assert backend.block_size == 512
    assert not backend.read_only
    assert backend.supports_discard and backend.supports_write_zeroes


def test_fresh_disk_reads_zeros(backend: BlockBackend) -> None:
    bufs = views(512, 4096, 1024, fill=0xAA)
    backend.read(3 * MiB, bufs)
    assert joined(bufs) == bytes(5632)


def test_write_read_scatter_gather(backend: BlockBackend) -> None:
    data = os.urandom(8192)
    src = [memoryview(bytearray(data[:1000])), memoryview(bytearray(data[1000:]))]
    backend.write(MiB + 512, src)
    dst = views(3000, 5192)
    backend.read(MiB + 512, dst)
    if isinstance(backend, NullBackend):
        assert joined(dst) == bytes(8192)
    else:
        assert joined(dst) == data
    backend.flush()


def test_write_zeroes_and_discard(backend: BlockBackend) -> None:
    backend.write(0, [memoryview(bytearray(b"\xff" * (64 * 1024)))])
    # Unaligned to pages on both ends: partial pages must be cleared too.
    backend.write_zeroes(512, 20 * 512, unmap=False)
    backend.write_zeroes(32 * 512, 20 * 512, unmap=True)
    out = views(64 * 1024)
    backend.read(0, out)
    data = joined(out)
    nonzero = 0 if isinstance(backend, NullBackend) else 0xFF
    assert data[:512] == bytes([nonzero]) * 512
    assert data[512 : 21 * 512] == bytes(20 * 512)
    assert data[21 * 512 : 32 * 512] == bytes([nonzero]) * (11 * 512)
    assert data[32 * 512 : 52 * 512] == bytes(20 * 512)
    assert data[52 * 512 :] == bytes([nonzero]) * (len(data) - 52 * 512)
    backend.discard(0, 64 * 1024)  # advisory; must not fail


def test_backends_are_registered_entry_points() -> None:
    assert load(Kind.BLK_BACKEND, "file") is FileBackend
    assert load(Kind.BLK_BACKEND, "ram") is RamBackend
    assert load(Kind.BLK_BACKEND, "null") is NullBackend


# --- ram and null ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [RamBackend, NullBackend])
@pytest.mark.parametrize(
    ("size", "message"),
    [("1X", "invalid size"), ("1000", "not a multiple of 512"), (0, "more than 0"),
     ("-5M", "invalid size"), (True, "invalid size")],
)  # fmt: skip
def test_bad_size_is_a_backend_error(cls: type, size: object, message: str) -> None:
    with pytest.raises(BackendError, match=f"^size: .*{message}"):
        cls(size)


def test_ram_discard_releases_pages() -> None:
    ram = RamBackend("64M")
    try:
        ram.write(0, [memoryview(bytearray(b"\x01" * (8 * MiB)))])
        before = _rss_of(ram)
        ram.discard(0, 8 * MiB)
        assert _rss_of(ram) <= before - 7 * MiB
        out = views(4096, fill=1)
        ram.read(4 * MiB, out)
        assert joined(out) == bytes(4096)
    finally:
        ram.close()


def _rss_of(ram: RamBackend) -> int:
    """Resident bytes of the RAM disk's mapping (from /proc/self/smaps)."""
    start = _address(ram)
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{start:x}":
            for entry in lines[i + 1 :]:
                if entry.startswith("Rss:"):
                    return int(entry.split()[1]) * 1024
    raise AssertionError("mapping not found")


def _address(ram: RamBackend) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(ram._map))


def test_ram_is_lazily_allocated() -> None:
    ram = RamBackend("1G")
    try:
        assert _rss_of(ram) < MiB
    finally:
        ram.close()


# --- file ------------------------------------------------------------------------------


def test_file_size_and_topology(image: Path) -> None:
    disk = FileBackend(str(image), serial="abc")
    try:
        assert disk.size == 16 * MiB
        assert disk.serial == "abc"
        assert disk.physical_block_size == os.stat(image).st_blksize
    finally:
        disk.close()


def test_file_sparse_image_stays_sparse(image: Path) -> None:
    disk = FileBackend(image)
    try:
        disk.read(0, views(MiB))
        disk.read(8 * MiB, views(MiB))
        disk.write(4 * MiB, [memoryview(bytearray(b"x" * 4096))])
        disk.flush()
        assert allocated(image) <= 64 * 1024
        assert os.path.getsize(image) == 16 * MiB
    finally:
        disk.close()


def test_file_discard_punches_a_hole(image: Path) -> None:
    disk = FileBackend(image)
    try:
        disk.write(0, [memoryview(bytearray(os.urandom(4 * MiB)))])
        disk.flush()
        full = allocated(image)
        assert full >= 4 * MiB
        disk.discard(MiB, 2 * MiB)
        assert allocated(image) <= full - 2 * MiB
        out = views(2 * MiB, fill=1)
        disk.read(MiB, out)
        assert joined(out) == bytes(2 * MiB)
        assert os.path.getsize(image) == 16 * MiB
    finally:
        disk.close()


def test_file_write_zeroes_unmap_punches_keep_allocates(image: Path) -> None:
    disk = FileBackend(image)
    try:
        disk.write(0, [memoryview(bytearray(b"\xee" * (4 * MiB)))])
        disk.flush()
        full = allocated(image)
        disk.write_zeroes(0, MiB, unmap=False)  # FALLOC_FL_ZERO_RANGE: stays allocated
        assert allocated(image) >= full - 64 * 1024
        disk.write_zeroes(MiB, MiB, unmap=True)
        assert allocated(image) <= full - MiB
        out = views(4 * MiB)
        disk.read(0, out)
        assert joined(out) == bytes(2 * MiB) + b"\xee" * (2 * MiB)
    finally:
        disk.close()


def test_file_write_zeroes_falls_back_to_writing(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def no_fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append(mode)
        import ctypes

        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(blk_file, "_fallocate", no_fallocate)
    disk = FileBackend(image)
    try:
        disk.write(0, [memoryview(bytearray(b"\x11" * (3 * MiB)))])
        disk.write_zeroes(512, 3 * MiB - 1024, unmap=True)
        disk.write_zeroes(512, 512, unmap=True)  # unsupported modes are not retried
        disk.discard(0, 512)  # advisory: no error
        out = views(3 * MiB)
        disk.read(0, out)
        assert joined(out) == b"\x11" * 512 + bytes(3 * MiB - 1024) + b"\x11" * 512
        assert len(calls) == 2
    finally:
        disk.close()


def test_file_short_transfers_resume(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """preadv/pwritev may move fewer bytes than asked: the backend carries on."""
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = []

    def short(real):  # type: ignore[no-untyped-def]
        def op(fd: int, buffers: list[memoryview], offset: int) -> int:
            calls.append(len(buffers))
            return real(fd, [buffers[0][:700]], offset)

        return op

    monkeypatch.setattr(os, "preadv", short(real_preadv))
    monkeypatch.setattr(os, "pwritev", short(real_pwritev))
    disk = FileBackend(image)
    try:
        data = os.urandom(4096)
        disk.write(512, [memoryview(bytearray(data[:1024])), memoryview(bytearray(data[1024:]))])
        out = views(1500, 2596)
        disk.read(512, out)
        assert joined(out) == data
        assert len(calls) >= 12
    finally:
        disk.close()


def test_file_read_past_end_of_file_is_an_io_error(image: Path) -> None:
    disk = FileBackend(image)
    try:
        with pytest.raises(OSError) as exc:
            disk.read(16 * MiB - 512, views(1024))
        assert exc.value.errno == errno.EIO
    finally:
        disk.close()


def test_file_readonly(image: Path) -> None:
    image.chmod(0o444)
    disk = FileBackend(image, readonly=True)
    try:
        assert disk.read_only
        disk.read(0, views(512))
        with pytest.raises(OSError):
            disk.write(0, views(512))
    finally:
        disk.close()


def test_file_direct_io(image: Path) -> None:
    disk = FileBackend(image, direct="true")
    try:
        assert disk._direct_fd is not None
        aligned = mmap.mmap(-1, 8192)  # page aligned: goes through O_DIRECT
        aligned[:] = os.urandom(8192)
        disk.write(4096, [memoryview(aligned)])
        unaligned = bytearray(4097)  # odd address and length: ordinary descriptor
        disk.read(4096, [memoryview(unaligned)[1:]])
        assert unaligned[1:] == aligned[:4096]
        aligned.close()
    finally:
        disk.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"readonly": "maybe"}, "^readonly: invalid flag"),
        ({"direct": "2"}, "^direct: invalid flag"),
    ],
)
def test_file_bad_flags(image: Path, kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(BackendError, match=message):
        FileBackend(image, **kwargs)  # type: ignore[arg-type]


def test_file_missing(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"^path: .*nope\.img does not exist$"):
        FileBackend(tmp_path / "nope.img")


def test_file_directory(tmp_path: Path) -> None:
    for readonly in (False, True):
        with pytest.raises(BackendError, match=r"^path: .* is a directory$"):
            FileBackend(tmp_path, readonly=readonly)


def test_file_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(BackendError, match="not a regular file or block device"):
        FileBackend(tmp_path / "fifo")


@pytest.mark.parametrize("size", [0, 1000])
def test_file_size_not_sectors(tmp_path: Path, size: int) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(size))
    with pytest.raises(BackendError, match=f"^path: .* is {size} bytes, not a"):
        FileBackend(path)


def test_file_not_writable() -> None:
    """A file the daemon may read but not write: refused unless readonly."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        path = Path(tmp) / "ro.img"
        path.write_bytes(bytes(4096))
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        if os.geteuid() != 0:
            message = _open_message(path)
        else:  # root ignores file modes: try as nobody, in a child
            message = _in_child_as_nobody(lambda: _open_message(path))
        assert message.startswith(f"path: {path} is not writable (")
        assert message.endswith("); use readonly")


def _open_message(path: Path) -> str:
    try:
        FileBackend(path).close()
    except BackendError as exc:
        FileBackend(path, readonly=True).close()  # but readonly is fine
        return str(exc)
    return "opened"


def _in_child_as_nobody(func) -> str:  # type: ignore[no-untyped-def]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, func().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message
