"""A descriptor chain popped from a virtqueue: the request's buffers in guest memory."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class DescriptorChain:
    """The buffers of one request, as memoryviews straight into guest memory.

    Device-readable buffers all come before device-writable ones (the rings enforce
    it). A descriptor that spans two adjacent memory regions yields two views.
    """

    #: Split ring: index of the head descriptor. Packed ring: the buffer id.
    head: int
    #: Device-readable buffers (the request), in order.
    readable: list[memoryview]
    #: Device-writable buffers (the response), in order.
    writable: list[memoryview]
    #: Ring descriptors the chain occupies (an indirect table counts as one).
    ndescs: int = 1
    #: Guest address and length of each descriptor, flat (gpa, len, gpa, len, ...):
    #: the device-readable ones first, then `nreadable` marks where writable ones start.
    addrs: list[int] = field(default_factory=list)
    #: How many of the `addrs` pairs are device-readable.
    nreadable: int = 0
    #: Bytes of the readable and of the writable buffers (the rings count them as they
    #: read descriptors; left out, they are summed from the views).
    readable_len: int = -1
    writable_len: int = -1

    def __post_init__(self) -> None:
        if self.readable_len < 0:
            self.readable_len = sum(v.nbytes for v in self.readable)
        if self.writable_len < 0:
            self.writable_len = sum(v.nbytes for v in self.writable)

    @property
    def readable_addrs(self) -> list[int]:
        """(gpa, len) pairs of the device-readable descriptors, flat."""
        return self.addrs[: 2 * self.nreadable]

    @property
    def writable_addrs(self) -> list[int]:
        """(gpa, len) pairs of the device-writable descriptors, flat."""
        return self.addrs[2 * self.nreadable :]

    def read_all(self) -> bytes:
        """A copy of all readable bytes (for headers; bulk data should use the views)."""
        return b"".join(self.readable)

    def write_into(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter `data` over the writable buffers from byte `offset` on.

        Returns the number of bytes stored: less than ``len(data)`` if space runs out.
        """
        src = memoryview(data).cast("B")
        done = 0
        for view in self.writable:
            if done == src.nbytes:
                break
            if offset >= view.nbytes:
                offset -= view.nbytes
                continue
            n = min(view.nbytes - offset, src.nbytes - done)
            view[offset : offset + n] = src[done : done + n]
            done += n
            offset = 0
        return done


def trim_addrs(addrs: list[int], head: int, tail: int) -> list[int]:
    """Flat (gpa, len) pairs of `addrs` without their first `head` and last `tail` bytes.

    For requests whose header and status share descriptors with the data (a driver
    may pack them any way it likes); zero-length pieces are dropped.
    """
    out: list[int] = []
    total = sum(addrs[1::2])
    end = total - tail
    pos = 0
    for i in range(0, len(addrs), 2):
        gpa, length = addrs[i], addrs[i + 1]
        start, stop = max(head, pos), min(end, pos + length)
        if start < stop:
            out += (gpa + start - pos, stop - start)
        pos += length
    return out
