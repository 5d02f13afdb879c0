"""Backend proxies: the BlockBackend / NetBackend a device gets when its real backend
runs in a driver domain. They forward every call over the channel's rings.

Block: the device hands a whole batch to `BlockProxy.offload` (installed by `attach`).
The batch runs on the event loop with every backend call *published* instead of
executed: each request goes on the ring at once (the child starts on the first while
the rest are still being written) and the batch waits for all of them, polling the
used ring a while (`AdaptivePoll`), then sleeping on the call eventfd. No worker thread
is involved.
A backend that takes several calls at once (`max_concurrency`, up to `MAX_LANES`) gets
as many lanes: a ring each, each served in order by a thread of its own in the child,
so that the device's concurrent batches overlap there as they would in-process.
Calls made outside a batch (another thread, another device model) block until the
child answers, on a ring of their own. Since a published call cannot raise, a batch in
which any request failed is run again call by call, so that every status is exact
(block I/O is idempotent, and failures are rare).

Data: with policy `map`, a request carries a table of guest addresses and lengths,
straight into guest memory, which the child has mapped at the same guest addresses
(zero copy); with `copy`, or for any buffer outside guest memory, data goes through the
ring's bounce area and the core copies it.

Net: frames cross through bounce areas in both policies (the device completes a
transmit chain as soon as `transmit` returns, and reads received frames synchronously);
received frames reach the device through `fileno` / `receive_into`, as from a TAP.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from vdev.backend import BlockBackend
from vdev.devices.base import Device
from vdev.devices.blk import BlkDevice, split_at
from vdev.domain.attributes import attribute
from vdev.domain.channel import (
    WRITE,
    AdaptivePoll,
    ChannelError,
    ChannelRing,
    Op,
    OpFlag,
    copy_views,
)
from vdev.domain.host import DomainError, DomainHost
from vdev.domain.net_proxy import NET_RINGS, NET_TX, NetProxy
from vdev.domain.spec import DomainSpec
from vdev.plugins import Kind
from vdev.virtio.errors import GuestMemoryError
from vdev.virtio.memory import GuestMemory

log = logging.getLogger(__name__)

_T = TypeVar("_T")

MiB = 1 << 20
#: Segments a request's table holds (virtio-blk offers seg_max 126); a request with
#: more is cut in several.
TABLE_SEGMENTS = 128
#: Batches in flight at once, at most (a backend says how many calls it takes at once
#: with `max_concurrency`); each has a ring of its own, served by a child thread.
MAX_LANES = 8
#: A block domain's rings, as (queue size, bounce bytes, table segments), by memory
#: policy: the ring for calls made outside a batch, and that of each lane. `map` only
#: bounces buffers outside guest memory; `copy` never uses the tables.
BLK_SYNC_RING = {"map": (256, 1 * MiB, TABLE_SEGMENTS), "copy": (256, 4 * MiB, 0)}
BLK_LANE_RING = {"map": (256, 1 * MiB, TABLE_SEGMENTS), "copy": (256, 8 * MiB, 0)}
#: Polling of the used ring by a waiting batch before it sleeps (see `AdaptivePoll`).
POLL_GROW = 10e-6
POLL_MAX = 200e-6
#: After a protocol violation, how long to wait for the supervisor to replace the child.
_MISBEHAVED_PAUSE = 0.05
_MAX_ERRNO = 4095


@dataclass(slots=True, eq=False)
class _Request:
    """One request on a ring (a large bounced transfer is cut into several)."""

    op: Op
    offset: int
    length: int
    #: Guest buffers: the source of a write, the destination of a read.
    views: Sequence[memoryview] = ()
    flags: int = 0
    #: Guest address and length of each view, in turn, when they travel by reference.
    refs: list[int] | None = None
    #: Bounce pieces to copy into `views` once a read completes.
    copy_back: list[memoryview] | None = None
    arena_end: int = 0
    head: int = 0
    error: int = 0


@dataclass(eq=False)
class _Batch:
    """The requests of one `offload` call, on the ring of its lane."""

    ring: ChannelRing
    deferred: deque[_Request] = field(default_factory=deque)
    pending: int = 0
    failed: bool = False


def _errno(value: int) -> int:
    """An errno from the child, which we do not trust."""
    return value if 0 < value <= _MAX_ERRNO else errno.EIO


class BlockProxy(BlockBackend):
    """A BlockBackend whose every call runs in the driver domain behind `host`."""

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
        self._map = host.spec.memory == "map"
        self._memory: GuestMemory | None = None
        self._sync_ring, *lanes = host.channel.rings
        #: Batches the device may run at once: one lane (ring, child thread) each.
        self.max_concurrency = len(lanes)
        self._idle_lanes = lanes
        self._lanes_free = trio.Semaphore(len(lanes))
        self._sync_lock = threading.Lock()
        self._local = threading.local()
        self._poll = AdaptivePoll(POLL_GROW, POLL_MAX)
        #: Batches run again call by call because a request failed.
        self.replays = 0

    @property
    def supports_discard(self) -> bool:
        return self._discard

    @property
    def supports_write_zeroes(self) -> bool:
        return self._write_zeroes

    # --- the BlockBackend contract --------------------------------------------------------

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._submit(Op.READ, offset, buffers)

    def write(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._submit(Op.WRITE, offset, buffers)

    def flush(self) -> None:
        self._submit(Op.FLUSH, 0, ())

    def discard(self, offset: int, length: int) -> None:
        self._submit(Op.DISCARD, offset, (), length=length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        flags = int(OpFlag.UNMAP) if unmap else 0
        self._submit(Op.WRITE_ZEROES, offset, (), length=length, flags=flags)

    def memory_changed(self, memory: GuestMemory) -> None:
        """The device's memory hook: with `map`, the child maps the same regions."""
        self._memory = memory
        if self._map:
            self.host.memory_changed(memory)

    def stats(self) -> dict[str, int]:
        return {**self.host.stats(), "domain_replays": self.replays}

    def close(self) -> None:
        self.host.close()

    # --- batches (BlkDevice's offload hop) ------------------------------------------------

    async def offload(self, queue_index: int, work: Callable[[], _T]) -> _T:
        """Run a device batch: publish its calls, wait for all, as `BlkDevice.offload`."""
        async with self._lanes_free:
            batch = _Batch(self._idle_lanes.pop())
            try:
                self._local.batch = batch
                try:
                    result = work()
                finally:
                    self._local.batch = None
                    # Even if `work` raised: what it published must be collected here.
                    if batch.pending or batch.deferred:
                        await self._finish(batch)
            finally:
                self._idle_lanes.append(batch.ring)
        if batch.failed:
            self.replays += 1
            return await trio.to_thread.run_sync(work)
        return result

    def _submit(
        self,
        op: Op,
        offset: int,
        views: Sequence[memoryview],
        *,
        length: int | None = None,
        flags: int = 0,
    ) -> None:
        batch: _Batch | None = getattr(self._local, "batch", None)
        ring = batch.ring if batch is not None else self._sync_ring
        requests = self._requests(ring, op, offset, views, length, flags)
        if batch is None:
            self._call(requests)
            return
        for request in requests:
            # One kick starts the child on the batch; `_finish` kicks for the rest if
            # it went back to sleep meanwhile.
            if not batch.deferred and self._publish(ring, request, kick=not batch.pending):
                batch.pending += 1
            else:
                batch.deferred.append(request)

    async def _finish(self, batch: _Batch) -> None:
        ring = batch.ring
        driver = ring.ring
        ring.kick()
        driver.set_interrupts(False)
        while batch.pending or batch.deferred:
            if self.host.failure is not None:
                self._abandon(ring, batch)
                return
            try:
                done = self._reap(ring)
            except ChannelError as exc:
                self.host.kill(str(exc))
                await trio.sleep(_MISBEHAVED_PAUSE)
                continue
            batch.pending -= len(done)
            batch.failed |= any(r.error for r in done)
            while batch.deferred and self._publish(ring, batch.deferred[0]):
                batch.deferred.popleft()
                batch.pending += 1
            if not batch.pending and not batch.deferred:
                return
            if not done:
                await self._wait_for_used(ring)

    async def _wait_for_used(self, ring: ChannelRing) -> None:
        """Until a completion may be there: poll a while if that has been paying off,
        then sleep on the call eventfd."""
        driver = ring.ring
        started = trio.current_time()
        if not await _poll(driver.has_used, self._poll.time):
            driver.set_interrupts(True)
            if not driver.has_used():
                await trio.lowlevel.wait_readable(ring.call_fd)
                ring.clear_call()
            driver.set_interrupts(False)
        self._poll.update(trio.current_time() - started)

    def _abandon(self, ring: ChannelRing, batch: _Batch) -> None:
        """The domain is gone: forget the batch's requests; it is replayed (and fails)."""
        ring.ring.abandon()
        batch.deferred.clear()
        batch.pending = 0
        batch.failed = True

    # --- calls outside a batch ------------------------------------------------------------

    def _call(self, requests: list[_Request]) -> None:
        """Run requests on the sync ring and wait for them (blocking this thread)."""
        ring = self._sync_ring
        pending = deque(requests)
        in_flight = 0
        error = 0
        with self._sync_lock:
            while pending or in_flight:
                if self.host.failure is not None:
                    ring.ring.abandon()
                    raise OSError(errno.EIO, self.host.failure)
                while pending and self._publish(ring, pending[0]):
                    pending.popleft()
                    in_flight += 1
                try:
                    done = self._reap(ring)
                except ChannelError as exc:
                    self.host.kill(str(exc))
                    time.sleep(_MISBEHAVED_PAUSE)
                    continue
                in_flight -= len(done)
                error = error or next((r.error for r in done if r.error), 0)
                if not done and in_flight:
                    _block_until_used(ring)
        if error:
            raise OSError(error, os.strerror(error))

    # --- requests on a ring ---------------------------------------------------------------

    def _requests(
        self,
        ring: ChannelRing,
        op: Op,
        offset: int,
        views: Sequence[memoryview],
        length: int | None,
        flags: int,
    ) -> list[_Request]:
        """The ring requests for one backend call: by reference when possible, else
        bounced; a call too large for one table or a quarter of the bounce area is cut
        in several requests."""
        views = [v for v in views if v.nbytes]
        if length is None:
            length = sum(v.nbytes for v in views)
        refs = self._references(views) if self._map and views else None
        if not views or (refs is not None and len(views) <= ring.layout.table_segments):
            return [_Request(op, offset, length, views, flags, refs)]
        requests = []
        if refs is not None:
            step = ring.layout.table_segments
            for i in range(0, len(views), step):
                piece = views[i : i + step]
                size = sum(v.nbytes for v in piece)
                requests.append(
                    _Request(op, offset, size, piece, flags, refs[2 * i : 2 * i + 2 * step])
                )
                offset += size
            return requests
        chunk = ring.arena.capacity // 4
        while views:
            piece, views = split_at(views, chunk)
            size = sum(v.nbytes for v in piece)
            requests.append(_Request(op, offset, size, piece, flags))
            offset += size
        return requests

    def _references(self, views: Sequence[memoryview]) -> list[int] | None:
        """Guest address and length of each of `views`, flat; None if one is not in
        guest memory."""
        memory = self._memory
        if memory is None:
            return None
        regions = memory.regions
        refs = []
        for view in views:
            try:
                index, offset = memory.locate(view)
            except GuestMemoryError:
                return None
            refs += (regions[index].guest_phys_addr + offset, view.nbytes)
        return refs

    def _publish(self, ring: ChannelRing, request: _Request, *, kick: bool = True) -> bool:
        """Put `request` on `ring` (and kick, unless told not to); False if it lacks
        room for now."""
        driver = ring.ring
        data: list[tuple[int, int, int]] = []
        if request.views and request.refs is None:
            if driver.free < 4:
                return False
            got = ring.arena.alloc(request.length)
            if got is None:
                return False
            pieces, request.arena_end = got
            bounce = [ring.bounce[o : o + n] for o, n in pieces]
            if request.op == Op.READ:
                request.copy_back = bounce
            else:
                copy_views(bounce, request.views)
            flag = WRITE if request.op == Op.READ else 0
            data = [(ring.bounce_gpa(o), n, flag) for o, n in pieces]
        elif driver.free < 2:
            return False
        head = request.head = driver.next_head()
        first, last = ring.request(
            head, request.op, request.flags, request.offset, request.length, request.refs or ()
        )
        driver.add([first, *data, last], request)
        if kick:
            ring.kick()
        return True

    def _reap(self, ring: ChannelRing) -> list[_Request]:
        """Collect completed requests: results read, bounced reads copied, space freed."""
        done = []
        with ring.lock:
            while (entry := ring.ring.take_used()) is not None:
                request = entry[0]
                assert isinstance(request, _Request)
                err = ring.result(request.head)
                if err:
                    request.error = _errno(err)
                elif request.copy_back is not None:
                    copy_views(request.views, request.copy_back)
                if request.arena_end:
                    ring.arena.release(request.arena_end)
                request.views = ()
                request.copy_back = None
                done.append(request)
        return done


async def _poll(has_used: Callable[[], bool], seconds: float) -> bool:
    """Spin a while (letting other tasks run) until `has_used`; False if it stays idle."""
    deadline = trio.current_time() + seconds
    while trio.current_time() < deadline:
        if has_used():
            return True
        await trio.lowlevel.checkpoint()
    return False


def _block_until_used(ring: ChannelRing) -> None:
    """Sleep on the call eventfd (with interrupts on) until a completion may be there."""
    driver = ring.ring
    driver.set_interrupts(True)
    if not driver.has_used():
        poller = select.poll()
        poller.register(ring.call_fd, select.POLLIN)
        poller.poll(1000)
        ring.clear_call()
    driver.set_interrupts(False)


def open_backend(
    kind: Kind, name: str, options: dict[str, Any], spec: DomainSpec
) -> BlockProxy | NetProxy:
    """Start backend `name` with `options` in a driver domain; return its proxy.

    Raises `DomainError` (with the backend's own message) if it cannot be built.
    """
    proxy: type[BlockProxy] | type[NetProxy]
    if kind == Kind.BLK_BACKEND:
        proxy = BlockProxy

        def rings(attributes: dict[str, Any]) -> list[tuple[int, int, int]]:
            wanted = attributes.get("max_concurrency", 1)
            lanes = min(max(wanted, 1), MAX_LANES) if type(wanted) is int else 1
            return [BLK_SYNC_RING[spec.memory]] + [BLK_LANE_RING[spec.memory]] * lanes

        host = DomainHost(kind, name, options, spec, rings)
    elif kind == Kind.NET_BACKEND:
        proxy = NetProxy
        host = DomainHost(kind, name, options, spec, lambda _: NET_RINGS, drop_on_restart={NET_TX})
    else:
        raise DomainError(f"{kind.label}s cannot run in a driver domain")
    try:
        return proxy(host)
    except BaseException:
        host.close()
        raise


def attach(device: Device, backend: BlockProxy | NetProxy) -> None:
    """Route the device's batches through the proxy (BlkDevice's `offload` hop)."""
    if isinstance(backend, BlockProxy) and isinstance(device, BlkDevice):
        device.offload = backend.offload
