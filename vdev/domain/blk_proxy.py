"""The block side of a driver domain: an executor that runs a device's batches in the
child, and the BlockBackend the device sees in place of the real backend.

`DomainExecutor.run` is called on the queue's worker thread with a batch of
`BlkRequest`s: every request goes on the executor's ring at once (the child starts on
the first while the rest are still being written), then the thread collects the
completions, spinning on the used ring for an adaptive while (`AdaptivePoll`) and then
sleeping on the ring's call eventfd. Nothing runs on the event loop, and no closure
crosses: a request travels as data (op, offset, length, and either a table of guest
addresses or bounced bytes).

Each queue gets a ring of its own (a "lane", served in order by a thread of its own
in the child) as long as lanes last; queues beyond them share one, in turn.

Data: with policy `map`, a request carries a table of guest addresses and lengths
(taken from its descriptors), straight into guest memory, which the child has mapped
at the same guest addresses (zero copy); with `copy`, or when a descriptor spans two
memory regions, data goes through the ring's bounce area and the core copies it.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from vdev.backend import BlockBackend
from vdev.devices.blk import split_at
from vdev.devices.blk_requests import BlkRequest, Range, RequestType, Status
from vdev.domain.attributes import attribute
from vdev.domain.channel import (
    WRITE,
    AdaptivePoll,
    ChannelError,
    ChannelRing,
    OpFlag,
    copy_views,
)
from vdev.domain.host import DomainHost
from vdev.virtio.memory import GuestMemory

log = logging.getLogger(__name__)

MiB = 1 << 20
#: Segments a request's table holds (virtio-blk offers seg_max 126); a request with
#: more is cut in several.
TABLE_SEGMENTS = 128
#: Lanes at most (rings with a child thread each).
MAX_LANES = 8
#: A block domain's rings, as (queue size, bounce bytes, table segments), by memory
#: policy: the ring for calls made outside the data path, and that of each lane.
#: `map` only bounces buffers that span regions; `copy` never uses the tables.
BLK_SYNC_RING = {"map": (256, 1 * MiB, TABLE_SEGMENTS), "copy": (256, 4 * MiB, 0)}
BLK_LANE_RING = {"map": (256, 1 * MiB, TABLE_SEGMENTS), "copy": (256, 8 * MiB, 0)}
#: Spinning on the used ring before sleeping on the call eventfd (see `AdaptivePoll`):
#: long enough for the child's answer to a small batch (see `vdev.domain.child`).
POLL_GROW = 4e-6
POLL_MAX = 100e-6
#: After a protocol violation, how long to wait for the supervisor to replace the child.
_MISBEHAVED_PAUSE = 0.05
#: How long one sleep on the call eventfd lasts before the thread looks again (a child
#: that dies does not signal).
_SLEEP_MS = 100
_STATUSES = frozenset(Status)


@dataclass(slots=True, eq=False)
class _Piece:
    """One request on a ring (a large bounced transfer is cut into several)."""

    owner: BlkRequest
    op: int
    offset: int
    length: int
    #: Guest buffers: the source of a write, the destination of a read.
    views: Sequence[memoryview] = ()
    flags: int = 0
    #: Guest address and length of each segment, when they travel by reference.
    refs: list[int] | None = None
    #: Bounce pieces to copy into `views` once a read completes.
    copy_back: list[memoryview] | None = None
    arena_end: int = 0
    head: int = 0


class DomainExecutor:
    """Runs batches of block requests in the driver domain, on one ring."""

    def __init__(self, host: DomainHost, ring: ChannelRing, lock: threading.Lock) -> None:
        self.host = host
        self.ring = ring
        self._lock = lock
        self._map = host.spec.memory == "map"
        self._poll = AdaptivePoll(POLL_GROW, POLL_MAX)

    def run(self, requests: Sequence[BlkRequest]) -> None:
        with self._lock:
            pieces = deque(p for r in requests for p in self._pieces(r))
            self._run(pieces)

    def close(self) -> None:
        pass

    def _run(self, todo: deque[_Piece]) -> None:
        ring = self.ring
        in_flight = 0
        kicked = False
        while todo or in_flight:
            if self.host.failure is not None and self._abandon(todo):
                return
            while todo and self._publish(todo[0]):
                todo.popleft()
                in_flight += 1
                if not kicked:  # start the child on the first while we write the rest
                    ring.kick()
                    kicked = True
            ring.kick()
            try:
                done = self._reap()
            except ChannelError as exc:
                self.host.kill(str(exc))
                time.sleep(_MISBEHAVED_PAUSE)
                continue
            in_flight -= done
            if not done and in_flight:
                self._wait()

    def _wait(self) -> None:
        """Until a completion may be there: spin a while if that has been paying off,
        then sleep on the call eventfd."""
        ring = self.ring
        has_used = ring.ring.has_used
        started = time.monotonic()
        deadline = started + self._poll.time
        while time.monotonic() < deadline:
            if has_used():
                break
            os.sched_yield()  # lets the child run if it shares our CPU
        else:
            ring.ring.set_interrupts(True)
            if not has_used():
                poller = select.poll()
                poller.register(ring.call_fd, select.POLLIN)
                poller.poll(_SLEEP_MS)
                ring.clear_call()
            ring.ring.set_interrupts(False)
        self._poll.update(time.monotonic() - started)

    def _abandon(self, todo: deque[_Piece]) -> bool:
        """The domain is gone: everything not completed fails (False if it came back
        meanwhile: the supervisor takes the ring's lock before a new child starts)."""
        with self.ring.lock:
            if self.host.failure is None:
                return False
            for piece in self.ring.abandon():
                piece.owner.status = Status.IOERR  # type: ignore[attr-defined]
        for piece in todo:
            piece.owner.status = Status.IOERR
        return True

    # --- requests on the ring -------------------------------------------------------------

    def _pieces(self, request: BlkRequest) -> list[_Piece]:
        """The ring requests for one block request: by reference when possible, else
        bounced; one too large for a table or a quarter of the bounce area is cut."""
        op = request.type
        if request.type in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
            return [
                _Piece(request, op, r.offset, r.length, flags=int(OpFlag.UNMAP) * r.unmap)
                for r in request.ranges
            ]
        views = request.data
        if not request.length:
            return [_Piece(request, op, request.offset, 0)]
        if self._map:
            refs = request.guest_segments()
            if len(refs) == 2 * len(views):  # each segment within one region
                step = 2 * self.ring.layout.table_segments
                if len(refs) <= step:
                    return [_Piece(request, op, request.offset, request.length, views, 0, refs)]
                return self._by_reference(request, op, refs, step)
        return self._bounced(request, op)

    def _by_reference(
        self, request: BlkRequest, op: int, refs: list[int], step: int
    ) -> list[_Piece]:
        pieces = []
        offset = request.offset
        for i in range(0, len(refs), step):
            part = refs[i : i + step]
            size = sum(part[1::2])
            pieces.append(_Piece(request, op, offset, size, (), 0, part))
            offset += size
        return pieces

    def _bounced(self, request: BlkRequest, op: int) -> list[_Piece]:
        chunk = self.ring.arena.capacity // 4
        pieces = []
        offset = request.offset
        views = list(request.data)
        while views:
            part, views = split_at(views, chunk)
            size = sum(v.nbytes for v in part)
            pieces.append(_Piece(request, op, offset, size, part))
            offset += size
        return pieces

    def _publish(self, piece: _Piece) -> bool:
        """Put `piece` on the ring; False if it lacks room for now."""
        ring = self.ring
        driver = ring.ring
        data: list[tuple[int, int, int]] = []
        if piece.views and piece.refs is None:
            if driver.free < 4:
                return False
            got = ring.arena.alloc(piece.length)
            if got is None:
                return False
            parts, piece.arena_end = got
            bounce = [ring.bounce[o : o + n] for o, n in parts]
            if piece.op == RequestType.IN:
                piece.copy_back = bounce
            else:
                copy_views(bounce, piece.views)
            flag = WRITE if piece.op == RequestType.IN else 0
            data = [(ring.bounce_gpa(o), n, flag) for o, n in parts]
        elif driver.free < 2:
            return False
        head = piece.head = driver.next_head()
        first, last = ring.request(
            head, piece.op, piece.flags, piece.offset, piece.length, piece.refs or ()
        )
        driver.add([first, *data, last], piece)
        return True

    def _reap(self) -> int:
        """Collect completed pieces: statuses set, bounced reads copied, space freed."""
        ring = self.ring
        done = 0
        with ring.lock:
            while (entry := ring.ring.take_used()) is not None:
                piece = entry[0]
                assert isinstance(piece, _Piece)
                status = ring.result(piece.head)
                if status:  # a status we do not know from the child is an I/O error
                    piece.owner.status = status if status in _STATUSES else Status.IOERR
                elif piece.copy_back is not None:
                    copy_views(piece.views, piece.copy_back)
                if piece.arena_end:
                    ring.arena.release(piece.arena_end)
                piece.views = ()
                piece.copy_back = None
                done += 1
        return done


class BlockProxy(BlockBackend):
    """The BlockBackend a device gets for a backend in the driver domain behind `host`.

    The device's queues run their batches through `executor(queue_index)`; the
    BlockBackend methods (for callers outside the data path) go through a ring of
    their own and raise `OSError` when the request fails.
    """

    def __init__(self, host: DomainHost) -> None:
        self.host = host
        attrs = host.attributes
        self.size = attribute(attrs, "size", int, 0)
        self.block_size = attribute(attrs, "block_size", int, 512)
        self.read_only = attribute(attrs, "read_only", bool, False)
        self.serial = attribute(attrs, "serial", str, "")
        self.physical_block_size = attribute(attrs, "physical_block_size", int, 0)
        self._discard = attribute(attrs, "supports_discard", bool, False)
        self._write_zeroes = attribute(attrs, "supports_write_zeroes", bool, False)
        self._resize = attribute(attrs, "supports_resize", bool, False)
        sync_ring, *lanes = host.channel.rings
        self._sync = DomainExecutor(host, sync_ring, threading.Lock())
        self._lanes = [(ring, threading.Lock()) for ring in lanes]

    @property
    def supports_discard(self) -> bool:
        return self._discard

    @property
    def supports_write_zeroes(self) -> bool:
        return self._write_zeroes

    @property
    def supports_resize(self) -> bool:
        return self._resize

    def executor(self, queue_index: int) -> DomainExecutor:
        """The executor of a device queue: its own lane while lanes last."""
        ring, lock = self._lanes[queue_index % len(self._lanes)]
        return DomainExecutor(self.host, ring, lock)

    # --- the BlockBackend contract --------------------------------------------------------

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._call(BlkRequest(RequestType.IN, offset, buffers, sum(b.nbytes for b in buffers)))

    def write(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._call(BlkRequest(RequestType.OUT, offset, buffers, sum(b.nbytes for b in buffers)))

    def flush(self) -> None:
        self._call(BlkRequest(RequestType.FLUSH))

    def discard(self, offset: int, length: int) -> None:
        self._call(BlkRequest(RequestType.DISCARD, ranges=(Range(offset, length, False),)))

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        zeroes = BlkRequest(RequestType.WRITE_ZEROES, ranges=(Range(offset, length, unmap),))
        self._call(zeroes)

    def resize(self, size: int) -> None:
        """The child resizes its backend (and every later child starts at that size)."""
        self.host.resize(size)
        self.size = size

    def _call(self, request: BlkRequest) -> None:
        self._sync.run([request])
        if request.status != Status.OK:
            raise OSError(errno.EIO, f"the driver domain failed the request ({request.status})")

    def memory_changed(self, memory: GuestMemory) -> None:
        """The device's memory hook: with `map`, the child maps the same regions (none:
        it unmaps them); a new table is a new session for the supervisor."""
        if self.host.spec.memory == "map":
            self.host.memory_changed(memory)
        elif memory.regions:
            self.host.new_session()

    def stats(self) -> dict[str, int]:
        return self.host.stats()

    def close(self) -> None:
        self.host.close()
