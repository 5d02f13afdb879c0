"""Helpers for the virtio-blk tests: request builders and queue stand-ins."""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from vdev.devices.blk import REQUEST_HEADER, SEGMENT, RequestType
from vdev.virtio.chain import DescriptorChain

SECTOR = 512


def header(kind: int, sector: int = 0) -> bytes:
    return REQUEST_HEADER.pack(kind, 0, sector)


def segments(*segs: tuple[int, int, int]) -> bytes:
    """Discard / write-zeroes payload from (sector, num_sectors, flags) triples."""
    return b"".join(SEGMENT.pack(*s) for s in segs)


@dataclass
class Req:
    """A request's bytes in "guest memory" (bytearrays) and the chain over them."""

    readable: list[bytearray]
    writable: list[bytearray]
    chain: DescriptorChain

    @property
    def status(self) -> int:
        return self.writable[-1][-1]

    @property
    def data_in(self) -> bytes:
        """Everything written before the status byte."""
        return b"".join(bytes(b) for b in self.writable)[:-1]


_next_head = 0


def make(readable: Sequence[bytes], writable_sizes: Sequence[int]) -> Req:
    """A chain over fresh buffers: `readable` contents, writable buffers of given sizes."""
    global _next_head
    _next_head += 1
    rd = [bytearray(b) for b in readable]
    wr = [bytearray(b"\xee" * n) for n in writable_sizes]
    chain = DescriptorChain(_next_head, [memoryview(b) for b in rd], [memoryview(b) for b in wr])
    return Req(rd, wr, chain)


def read_req(sector: int, length: int) -> Req:
    return make([header(RequestType.IN, sector)], [length, 1])


def write_req(sector: int, data: bytes) -> Req:
    return make([header(RequestType.OUT, sector), data], [1])


def simple_req(kind: int, payload: bytes = b"", writable: Sequence[int] = (1,)) -> Req:
    parts = [header(kind)] + ([payload] if payload else [])
    return make(parts, writable)


@dataclass
class ListQueue:
    """A `Queue` over a list of prepared chains (records pushes and notifies)."""

    index: int = 0
    size: int = 256
    pending: deque[DescriptorChain] = field(default_factory=deque)
    used: list[tuple[int, int]] = field(default_factory=list)
    notifies: int = 0

    def add(self, *reqs: Req) -> None:
        self.pending.extend(r.chain for r in reqs)

    counters: dict[str, int] = field(default_factory=dict)
    flushes: int = 0

    def pop_batch(self, limit: int) -> list[DescriptorChain]:
        return [self.pending.popleft() for _ in range(min(limit, len(self.pending)))]

    def pop(self) -> DescriptorChain | None:
        return self.pending.popleft() if self.pending else None

    def fill(self, chain: DescriptorChain, written: int) -> None:
        self.used.append((chain.head, written))

    def flush(self) -> None:
        self.flushes += 1

    def push(self, chain: DescriptorChain, written: int) -> None:
        self.fill(chain, written)
        self.flush()

    def notify(self) -> None:
        self.notifies += 1

    def wake(self) -> None:
        pass

    def written(self, req: Req) -> int:
        return dict(self.used)[req.chain.head]


def le32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])
