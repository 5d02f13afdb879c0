"""A vhost-user front-end in Python: drive any vdev device over a real socket.

This is how plugin authors unit-test a backend without QEMU: start the device with
`vdev.testing.serve_device` (or `vdev run`), connect a `Frontend`, negotiate, set up
queues in memfd-backed guest memory, submit chains and check what comes back::

    async with serve_device(MyDevice(), tmp_path / "dev.sock") as path:
        async with Frontend.connect(path) as fe:
            await fe.negotiate()
            queue = await fe.setup_queue(0)
            used = await queue.transact([b"request"], [4096])
            assert used.data[0].startswith(b"reply")
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import trio

from vdev.devices.base import Device
from vdev.fdpass import recv_with_fds, send_with_fds
from vdev.protocol import (
    F_PROTOCOL_FEATURES,
    BackendMessage,
    DeviceConfig,
    FrontendChannel,
    FrontendConnection,
    InflightDescription,
    LogDescription,
    MemoryRegion,
    MemoryTable,
    Message,
    ProtocolFeature,
    Request,
    VringAddress,
    VringFile,
    VringState,
)
from vdev.protocol.constants import VHOST_F_LOG_ALL, VHOST_VRING_F_LOG
from vdev.server import DeviceServer
from vdev.testing.driver_rings import DriverPackedRing, DriverSplitRing, UsedBuffer
from vdev.testing.fakemem import FakeGuestMemory
from vdev.trioutil import unwrap_single
from vdev.virtio.features import TRANSPORT_FEATURES, VirtioFeature
from vdev.virtio.inflight import InflightBuffer

#: Front-end virtual addresses differ from guest addresses, as in QEMU.
_USER_OFFSET = 0x7F00_0000_0000


class FrontendError(Exception):
    """The device answered something unexpected (or not in time)."""


@dataclass
class InflightFd:
    """The in-flight buffer a device handed out (GET_INFLIGHT_FD): the front-end keeps
    it across back-end restarts and hands it to each successor (SET_INFLIGHT_FD)."""

    fd: int
    description: InflightDescription

    def mapped(self) -> InflightBuffer:
        """A mapping of the buffer, to look at what the device recorded (close it)."""
        d = self.description
        fd = os.dup(self.fd)
        try:
            return InflightBuffer(fd, d.mmap_size, d.mmap_offset, d.num_queues, d.queue_size)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        os.close(self.fd)


class FrontendQueue:
    """One queue as the driver sees it: add chains, kick, collect used buffers."""

    def __init__(
        self, index: int, ring: DriverSplitRing | DriverPackedRing, kick_fd: int, call_fd: int
    ) -> None:
        self.index = index
        self.ring = ring
        self.kick_fd = kick_fd
        self.call_fd = call_fd

    def add(
        self, readable: Sequence[bytes], writable_sizes: Sequence[int], *, indirect: bool = False
    ) -> int:
        """Publish a chain (see `DriverSplitRing.add`); returns its token."""
        return self.ring.add(readable, writable_sizes, indirect=indirect)

    def kick(self) -> None:
        """Notify the device, if it asked to be notified."""
        if self.ring.kick_needed():
            os.eventfd_write(self.kick_fd, 1)

    async def wait_used(self, count: int = 1, timeout: float = 10.0) -> list[UsedBuffer]:
        """Wait until `count` chains are used (interrupt or not); return them."""
        done: list[UsedBuffer] = []
        with trio.move_on_after(timeout):
            while True:
                done.extend(self.ring.get_used())
                if len(done) >= count:
                    return done
                with trio.move_on_after(0.05):  # the device may rightly not interrupt
                    await trio.lowlevel.wait_readable(self.call_fd)
                    with suppress(BlockingIOError):
                        os.eventfd_read(self.call_fd)
        raise FrontendError(f"queue {self.index}: {len(done)} of {count} chains used in {timeout}s")

    async def transact(
        self, readable: Sequence[bytes], writable_sizes: Sequence[int], **kwargs: float
    ) -> UsedBuffer:
        """Add one chain, kick, and wait for it."""
        self.add(readable, writable_sizes)
        self.kick()
        [used] = await self.wait_used(1, **kwargs)
        return used

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


class Frontend:
    """A vhost-user front-end session over a connected Unix socket.

    With a `nursery` (`connect` gives one) it negotiates BACKEND_REQ, hands the device
    a back-end channel (a socketpair, SET_BACKEND_REQ_FD), and a task there collects
    the device's requests in `backend_requests`, first awaiting `on_backend_request`
    (QEMU reads the config there), then answering those that ask with
    `backend_answer`: a result (0 for success), raw bytes to send instead, or None for
    no answer at all.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        memory: FakeGuestMemory,
        nursery: trio.Nursery | None = None,
    ) -> None:
        self.sock = sock
        self.memory = memory
        self.conn = FrontendConnection()
        self.features = 0
        self.protocol_features = 0
        self.queues: dict[int, FrontendQueue] = {}
        self.nursery = nursery
        self.backend_sock: trio.socket.SocketType | None = None
        self.backend_requests: list[BackendMessage] = []
        self.backend_answer: int | bytes | None = 0
        self.on_backend_request: Callable[[BackendMessage], Awaitable[object]] | None = None
        self._backend_arrived = trio.Event()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        path: str | Path,
        *,
        mem_size: int = 8 << 20,
        regions: int = 2,
        memory: FakeGuestMemory | None = None,
        keep_memory: bool = False,
    ) -> AsyncIterator[Frontend]:
        """Connect to a device socket, with memfd guest memory of `mem_size` bytes (or
        the given `memory`, closed at the end too unless `keep_memory`: a front-end
        that reconnects to a restarted device keeps its guest memory)."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if memory is None:
            memory = FakeGuestMemory(
                mem_size, regions=regions, memfd=True, user_offset=0x7F00_0000_0000
            )
        try:
            await sock.connect(str(path))
            async with trio.open_nursery() as nursery:
                fe = cls(sock, memory, nursery)
                try:
                    yield fe
                finally:
                    fe.close()
                    nursery.cancel_scope.cancel()
        finally:
            sock.close()
            if not keep_memory:
                memory.close()

    # --- raw requests ------------------------------------------------------------------

    async def send(
        self,
        request: Request,
        payload: object = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
    ) -> Message | None:
        """Send one request; return its reply (or ack) if one is expected."""
        await send_with_fds(
            self.sock, self.conn.send(request, payload, fds, need_reply=need_reply), fds
        )
        if not self.conn.pending_replies:
            return None
        return await self.reply()

    async def reply(self) -> Message:
        while (msg := self.conn.next_reply()) is None:
            data, fds, _ = await recv_with_fds(self.sock)
            if not data:
                raise FrontendError("the device closed the connection")
            self.conn.receive_data(data, fds)
        return msg

    # --- the usual session -------------------------------------------------------------

    async def negotiate(
        self,
        features: int | None = None,
        *,
        packed: bool = False,
        inflight: InflightFd | None = None,
    ) -> int:
        """SET_OWNER, features, protocol features, memory table; return acked features.

        `features` defaults to everything offered except VHOST_F_LOG_ALL (QEMU acks it only
        while migrating) and RING_PACKED (unless `packed`).
        An `inflight` buffer kept from a previous back-end goes to this one before the
        memory table, where QEMU 7.2's vhost_user_blk_start sends it (on a reconnect
        QEMU sends: SET_FEATURES, SET_INFLIGHT_FD, SET_FEATURES, the memory table, each
        ring's messages, SET_STATUS; it asks GET_INFLIGHT_FD once, of the first back-end).
        """
        await self.send(Request.SET_OWNER)
        offered = (await self.send(Request.GET_FEATURES)).payload  # type: ignore[union-attr]
        assert isinstance(offered, int)
        if offered & F_PROTOCOL_FEATURES:
            msg = await self.send(Request.GET_PROTOCOL_FEATURES)
            assert msg is not None and isinstance(msg.payload, int)
            self.protocol_features = msg.payload
            if self.nursery is None:  # nothing could serve a back-end channel
                self.protocol_features &= ~ProtocolFeature.BACKEND_REQ
            await self.send(Request.SET_PROTOCOL_FEATURES, self.protocol_features)
            if self.protocol_features & ProtocolFeature.BACKEND_REQ:
                await self.open_backend_channel()
        if features is None:  # QEMU acks VHOST_F_LOG_ALL only while it migrates
            features = offered & ~VHOST_F_LOG_ALL
            if not packed:
                features &= ~VirtioFeature.RING_PACKED
        self.features = features
        await self.send(Request.SET_FEATURES, features, need_reply=self._acks)
        if inflight is not None:
            await self.set_inflight_fd(inflight)
        await self.set_mem_table()
        return features

    @property
    def _acks(self) -> bool:
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    async def set_mem_table(self) -> None:
        regions = self.memory.regions
        table = MemoryTable(
            tuple(
                MemoryRegion(r.guest_phys_addr, r.size, r.user_addr, r.mmap_offset) for r in regions
            )
        )
        fds = [r.fd for r in regions]
        await self.send(Request.SET_MEM_TABLE, table, fds, need_reply=self._acks)  # type: ignore[arg-type]

    # --- in-flight tracking (INFLIGHT_SHMFD) ---------------------------------------------

    async def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightFd:
        """GET_INFLIGHT_FD: a new in-flight buffer from the device, now the caller's."""
        msg = await self.send(
            Request.GET_INFLIGHT_FD, InflightDescription(0, 0, num_queues, queue_size)
        )
        if msg is None or not isinstance(msg.payload, InflightDescription) or len(msg.fds) != 1:
            raise FrontendError(f"GET_INFLIGHT_FD failed: {msg}")
        return InflightFd(msg.fds[0], msg.payload)

    async def set_inflight_fd(self, inflight: InflightFd) -> None:
        """SET_INFLIGHT_FD: the device tracks its requests in `inflight` (which stays the
        caller's)."""
        await self.send(
            Request.SET_INFLIGHT_FD, inflight.description, [inflight.fd], need_reply=self._acks
        )

    # --- the back-end channel ------------------------------------------------------------

    async def open_backend_channel(self) -> None:
        """Hand the device a new back-end channel (SET_BACKEND_REQ_FD); the old one, if
        any, is closed."""
        if self.nursery is None:
            raise FrontendError("a back-end channel needs a nursery (use Frontend.connect)")
        ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            await self.send(
                Request.SET_BACKEND_REQ_FD, None, [theirs.fileno()], need_reply=self._acks
            )
        self.close_backend_channel()
        self.backend_sock = ours
        self.nursery.start_soon(self._serve_backend_channel, ours)

    def close_backend_channel(self) -> None:
        if self.backend_sock is not None:
            self.backend_sock.close()
            self.backend_sock = None

    async def wait_backend_requests(
        self, count: int, timeout: float = 10.0
    ) -> list[BackendMessage]:
        """Wait until the device sent `count` back-end requests in all; return them all."""
        with trio.move_on_after(timeout):
            while len(self.backend_requests) < count:
                await self._backend_arrived.wait()
            return self.backend_requests
        got = len(self.backend_requests)
        raise FrontendError(f"{got} of {count} back-end requests in {timeout}s")

    async def _serve_backend_channel(self, sock: trio.socket.SocketType) -> None:
        channel = FrontendChannel()
        try:
            while True:
                data, fds, _ = await recv_with_fds(sock)
                if not data:
                    return
                channel.receive_data(data, fds)
                while (msg := channel.next_request()) is not None:
                    if self.on_backend_request is not None:
                        await self.on_backend_request(msg)
                    self.backend_requests.append(msg)
                    self._backend_arrived.set()
                    self._backend_arrived = trio.Event()
                    answer = self.backend_answer
                    if msg.need_reply and answer is not None:
                        reply = answer if isinstance(answer, bytes) else channel.reply(msg, answer)
                        await send_with_fds(sock, reply)
        except (trio.ClosedResourceError, OSError):
            return  # closed here, or by the device
        finally:
            channel.close()

    async def get_config(self, offset: int, size: int) -> bytes:
        msg = await self.send(Request.GET_CONFIG, DeviceConfig(offset, size, 0, bytes(size)))
        if msg is None or not isinstance(msg.payload, DeviceConfig):
            raise FrontendError("GET_CONFIG failed")
        return msg.payload.data

    async def setup_queue(self, index: int, size: int = 64) -> FrontendQueue:
        """Lay out a ring in guest memory and hand it to the device, enabled."""
        ring_features = self.features & TRANSPORT_FEATURES
        ring: DriverSplitRing | DriverPackedRing
        if self.features & VirtioFeature.RING_PACKED:
            ring = DriverPackedRing(self.memory, size, features=ring_features)
        else:
            ring = DriverSplitRing(self.memory, size, features=ring_features)
        return await self._start_queue(index, ring, ring.base)

    async def resume_queue(
        self, index: int, ring: DriverSplitRing | DriverPackedRing
    ) -> FrontendQueue:
        """Hand a new device the ring a previous one served until it died, as QEMU 7.2
        does after a reconnect: the old device could not answer GET_VRING_BASE, so a
        split ring's base is its used index in guest memory
        (virtio_queue_restore_last_avail_idx) and a packed ring's the base it was
        started with (QEMU restores nothing for packed rings). The device takes the
        real positions from the in-flight buffer, if it was given one."""
        base = ring.device_used_idx if isinstance(ring, DriverSplitRing) else ring.base
        return await self._start_queue(index, ring, base)

    async def _start_queue(
        self, index: int, ring: DriverSplitRing | DriverPackedRing, base: int
    ) -> FrontendQueue:
        """New kick and call eventfds and the ring's messages in the order QEMU 7.2
        sends them (traced): CALL, then NUM, BASE, ADDR, KICK (vhost_virtqueue_start),
        then ENABLE (vhost_dev_set_vring_enable)."""
        kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        queue = FrontendQueue(index, ring, kick_fd, call_fd)
        ack = self._acks
        await self.send(Request.SET_VRING_CALL, VringFile(index, True), [call_fd], need_reply=ack)
        await self.send(Request.SET_VRING_NUM, VringState(index, ring.size), need_reply=ack)
        await self.send(Request.SET_VRING_BASE, VringState(index, base), need_reply=ack)
        await self.send(Request.SET_VRING_ADDR, _vring_address(index, ring), need_reply=ack)
        await self.send(Request.SET_VRING_KICK, VringFile(index, True), [kick_fd], need_reply=ack)
        if self.features & F_PROTOCOL_FEATURES:
            await self.send(Request.SET_VRING_ENABLE, VringState(index, 1), need_reply=ack)
        self.queues[index] = queue
        return queue

    async def set_log_base(self, size: int) -> mmap.mmap:
        """Hand the device a dirty log of `size` bytes (SET_LOG_BASE: a sealed memfd,
        as QEMU's) and return it mapped: read it with `vdev.virtio.dirtylog.dirty_pages`."""
        fd = os.memfd_create("vdev-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            log = mmap.mmap(fd, size)
            reply = await self.send(Request.SET_LOG_BASE, LogDescription(size, 0), [fd])
        finally:
            os.close(fd)
        if reply is None or reply.payload != 0:
            log.close()
            raise FrontendError("the device refused the dirty log")
        return log

    async def log_rings(self, enabled: bool = True) -> None:
        """Ask the device to log its stores into every queue's used ring, or not
        (SET_VRING_ADDR with VHOST_VRING_F_LOG and the used ring's guest address)."""
        for index, queue in self.queues.items():
            address = _vring_address(index, queue.ring, log=enabled)
            await self.send(Request.SET_VRING_ADDR, address, need_reply=self._acks)

    async def stop_queue(self, index: int) -> int:
        """GET_VRING_BASE: stop the queue; return the device's base."""
        msg = await self.send(Request.GET_VRING_BASE, VringState(index, 0))
        assert msg is not None and isinstance(msg.payload, VringState)
        return msg.payload.num

    def close(self) -> None:
        for queue in self.queues.values():
            queue.close()
        self.queues.clear()
        self.close_backend_channel()
        self.conn.close()


def _vring_address(
    index: int, ring: DriverSplitRing | DriverPackedRing, log: bool = False
) -> VringAddress:
    flags, log_addr = (VHOST_VRING_F_LOG, ring.used_gpa) if log else (0, 0)
    return VringAddress(index, flags, ring.desc_addr, ring.used_addr, ring.avail_addr, log_addr)


@asynccontextmanager
async def running_server(device: Device, path: str | Path) -> AsyncIterator[DeviceServer]:
    """Serve `device` on a socket at `path` in the background, for the block's duration;
    yields the server (for `DeviceServer.resize`, `set_link`, ...)."""
    server = DeviceServer(device, path)
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()


@asynccontextmanager
async def serve_device(device: Device, path: str | Path) -> AsyncIterator[Path]:
    """Serve `device` on a socket at `path` in the background, for the block's duration."""
    async with running_server(device, path) as server:
        yield server.path
