"""The contracts a backend author implements.

A backend knows nothing about vhost-user, virtqueues or trio: a block backend reads and
writes bytes at offsets, a net backend moves Ethernet frames. The device models in
`vdev.devices` turn virtio requests into these calls, in the vdev process or in a
separate driver domain, without the backend noticing the difference.

Buffers are memoryviews straight into guest memory, so a backend can `os.preadv` into
them or `os.pwritev` from them with no copy. A backend must not keep a reference to a
buffer after the call returns.

Exports:

- `BlockBackend`: the block contract (`size`, `read`, `write`; the rest optional);
- `NetBackend`, `DeliverFn`: the net contract (`transmit`; delivery into the guest);
- `BackendError`: raise it for a backend that cannot be created or used;
- option parsing for constructors, which get each option as a Python value (TOML) or
  text (`-o KEY=VALUE`): `size_option` ("512M"), `int_option`, `bool_option`
  ("on"/"off"), `block_size_option` (one of `BLOCK_SIZES`, dividing the disk); each
  raises `OptionError` (a BackendError and a ValueError) naming the option.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vdev.units import parse_bool, parse_int, parse_size

__all__ = [
    "BLOCK_SIZES",
    "BackendError",
    "BlockBackend",
    "DeliverFn",
    "NetBackend",
    "OptionError",
    "block_size_option",
    "bool_option",
    "int_option",
    "size_option",
]


class BackendError(Exception):
    """A backend cannot be created or used (bad option, missing file, ...)."""


class OptionError(BackendError, ValueError):
    """An option has a bad value; the message starts with the option's name."""


def size_option(name: str, value: int | str, *, multiple_of: int = 1) -> int:
    """Bytes given as an int or text such as "4096", "512M", "1G" (binary suffixes)."""
    try:
        return parse_size(value, multiple_of=multiple_of)
    except ValueError as exc:
        raise OptionError(f"{name}: {exc}") from None


def int_option(name: str, value: int | str, low: int, high: int) -> int:
    """A whole number from `low` to `high` (inclusive), given as an int or text."""
    try:
        return parse_int(value, low, high)
    except ValueError as exc:
        raise OptionError(f"{name}: {exc}") from None


def bool_option(name: str, value: bool | int | str) -> bool:
    """A flag given as a bool, 0/1, or text: true/false, yes/no, on/off."""
    try:
        return parse_bool(value)
    except ValueError as exc:
        raise OptionError(f"{name}: {exc}") from None


#: Logical block sizes a disk may have (what Linux accepts: 512 bytes to a page).
BLOCK_SIZES = (512, 1024, 2048, 4096)


def block_size_option(value: int | str, size: int) -> int:
    """The `block_size` option of a disk of `size` bytes, checked (OptionError)."""
    try:
        block_size = int(value)
    except (TypeError, ValueError):
        raise OptionError(f"block_size: {value!r} is not a number") from None
    if block_size not in BLOCK_SIZES:
        choices = ", ".join(map(str, BLOCK_SIZES))
        raise OptionError(f"block_size: {block_size} is not one of {choices}")
    if size % block_size:
        raise OptionError(
            f"block_size: the disk's {size} bytes are not whole {block_size}-byte blocks"
        )
    return block_size


class BlockBackend:
    """A block device's storage: `size` bytes addressed by byte offset.

    Required: `size`, `read`, `write`. Everything else has a default (`resize`: none,
    the disk keeps its size).
    Methods are called on the queue's worker thread (never on the event loop), one
    request at a time, or from up to `max_concurrency` I/O threads at once for requests
    larger than `inline_bytes`; raise `OSError` for an I/O error (the guest sees
    VIRTIO_BLK_S_IOERR).
    """

    size: int = 0
    #: Logical block: the guest addresses the disk in these (requests are aligned).
    block_size: int = 512
    read_only: bool = False
    #: Serial number the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    serial: str = ""
    #: Physical block size the guest should align to (0: unknown).
    physical_block_size: int = 0
    #: How many calls may run at once (from several threads); 1 = serial, inline.
    max_concurrency: int = 1
    #: With `max_concurrency` > 1: requests up to this many bytes still run inline on
    #: the queue's worker thread (a hand-off costs more than a small page-cache copy).
    inline_bytes: int = 0
    #: A file descriptor opened with O_DIRECT on the same data, if the backend has one:
    #: the device then submits reads and writes to it with Linux AIO, a batch at once.
    direct_fd: int | None = None

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill `buffers`, in order, with the bytes starting at `offset`."""
        raise NotImplementedError

    def write(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Store the bytes of `buffers`, in order, starting at `offset`."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make every completed write durable."""

    def discard(self, offset: int, length: int) -> None:
        """Forget `length` bytes at `offset` (reads may then return anything)."""
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make `length` bytes at `offset` read as zeros; `unmap` allows deallocating."""
        raise NotImplementedError

    def resize(self, size: int) -> None:
        """Grow or shrink the storage to `size` bytes (whole blocks, already checked)
        and update `size`; raise BackendError or OSError if it cannot be. Called from a
        thread of its own while requests run: one past the new end must fail (OSError).
        """
        raise NotImplementedError

    @property
    def supports_resize(self) -> bool:
        return type(self).resize is not BlockBackend.resize

    @property
    def supports_discard(self) -> bool:
        return type(self).discard is not BlockBackend.discard

    @property
    def supports_write_zeroes(self) -> bool:
        return type(self).write_zeroes is not BlockBackend.write_zeroes

    def close(self) -> None:
        """Release files and memory. Called once, when the daemon stops."""


#: Called by a net backend to put one frame into the guest; False if it was dropped
#: (no receive buffers, or the frame is larger than the guest's buffers).
DeliverFn = Callable[[bytes | memoryview], bool]


class NetBackend:
    """An Ethernet port: frames the guest transmits, frames delivered to the guest.

    Required: `transmit`. A backend that produces frames on its own (a switch, a
    responder) calls the `deliver` function it was given by `attach`, from any thread.
    A backend backed by file descriptors (a TAP) may instead expose `fileno(pair)` and
    `receive_into()`, and the device then reads frames straight into guest buffers
    (zero copy), each queue pair from its own fd where the backend has one per pair.
    Methods are called on the queue pair's worker thread, never on the event loop.
    """

    #: True: frames carry the 12-byte virtio_net_hdr_v1 in front, exactly as the guest
    #: wrote it (a TAP opened with IFF_VNET_HDR wants this, for offloads).
    vnet_hdr: bool = False
    #: Offload feature bits (VIRTIO_NET_F_CSUM, ...) this backend can carry; only used
    #: when `vnet_hdr` is True.
    offload_features: int = 0

    def attach(self, deliver: DeliverFn) -> None:
        """Remember how to deliver frames into the guest. Called before any traffic."""
        self.deliver = deliver

    def set_features(self, features: int) -> None:
        """The virtio-net features the guest accepted (to set TAP offloads, ...)."""

    def set_mtu(self, mtu: int) -> None:
        """The front-end set the link MTU (NET_SET_MTU); a backend with a link applies it.

        Called from a thread of its own, so it may block (netlink); raise `OSError`
        if the link cannot take it.
        """

    def transmit(self, frames: list[Sequence[memoryview]]) -> int | None:
        """Send a batch of frames from the guest, each given as a scatter list.

        Frames are at most 64 KiB plus headers (the device drops larger ones). Return
        how many could not be sent (None: all were), or raise `OSError` if none was.
        """
        raise NotImplementedError

    def fileno(self, pair: int = 0) -> int | None:
        """A non-blocking fd, readable when `receive_into(..., pair)` has a frame for
        queue pair `pair`, or None (that pair then receives only what `deliver` gives)."""
        return None

    def enable_queue(self, pair: int, enabled: bool) -> None:
        """Queue pair `pair` started or stopped receiving (a multi-queue TAP attaches or
        detaches that pair's fd, so that the kernel steers no flow to a queue nobody
        reads)."""

    def receive_into(self, buffers: Sequence[memoryview], pair: int = 0) -> int:
        """Read one frame of queue pair `pair` into `buffers`; return its length.

        BlockingIOError if there is none.
        """
        raise BlockingIOError

    def close(self) -> None:
        """Release the port. Called once, when the daemon stops."""
