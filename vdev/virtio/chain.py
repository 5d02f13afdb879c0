"""A descriptor chain popped from a virtqueue: the request's buffers in guest memory."""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def readable_len(self) -> int:
        return sum(v.nbytes for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(v.nbytes for v in self.writable)

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
