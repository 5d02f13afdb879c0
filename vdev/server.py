"""vhost-user sessions over Unix sockets: one device, one front-end at a time.

`DeviceServer` owns a socket (listening, or connecting out with `client=True`) and
serves a front-end on it; when the front-end goes away the device is reset and the
server waits for the next one. `Session` is one front-end connection: it feeds the
sans-I/O `BackendConnection`, acts on its events (memory, vrings, config) and sends
the replies back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from vdev.devices.base import Device, DeviceError
from vdev.fdpass import recv_message, recv_with_fds, send_with_fds
from vdev.protocol import (
    F_PROTOCOL_FEATURES,
    BackendChannel,
    BackendConnection,
    BackendRequest,
    DeviceConfig,
    InflightDescription,
    LogDescription,
    MemoryRegionUpdate,
    MemoryTable,
    Message,
    ProtocolError,
    ProtocolFeature,
    RemoteProtocolError,
    VringAddress,
    VringState,
)
from vdev.protocol.constants import VHOST_F_LOG_ALL
from vdev.protocol.describe import SessionTrace
from vdev.virtio import dirtylog
from vdev.virtio.dirtylog import DirtyLog
from vdev.virtio.errors import VirtioError
from vdev.virtio.features import TRANSPORT_FEATURES, VirtioFeature
from vdev.virtio.inflight import InflightBuffer
from vdev.virtio.memory import GuestMemory
from vdev.vring import Vring
from vdev.worker import POLL_MAX, QueueWorkers

log = logging.getLogger(__name__)

#: Protocol features every vdev device offers; devices add their own (RARP, ...), and
#: CONFIG and BACKEND_REQ (to signal config changes) when the front-end reads their
#: config space (`Device.config_space`).
BASE_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
    | ProtocolFeature.INFLIGHT_SHMFD
    # Live migration (a dirty log) is offered where it works (`dirtylog.available`).
    | (ProtocolFeature.LOG_SHMFD if dirtylog.available() else 0)
)
#: VHOST_F_LOG_ALL, offered with LOG_SHMFD.
_LOG_FEATURES = VHOST_F_LOG_ALL if dirtylog.available() else 0
MAX_MEM_SLOTS = 509
#: Longest Unix socket path a peer can connect to (sun_path holds 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
#: How long a new connection waits for the previous session to wind down.
SESSION_END_GRACE = 1.0
#: accept() errors that pass once sessions release fds or memory; retried after a delay.
_TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_RETRY_DELAY = 0.1
#: At most ERROR_BURST error lines per ERROR_WINDOW seconds from one device's sessions.
ERROR_BURST = 10
ERROR_WINDOW = 1.0
#: How long the front-end has to acknowledge a config change (with REPLY_ACK).
CONFIG_CHANGE_TIMEOUT = 5.0


def protocol_features(device: Device) -> int:
    """The vhost-user protocol features offered for `device`."""
    config = ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ if device.config_space else 0
    return BASE_PROTOCOL_FEATURES | config | device.protocol_features


class ServerError(Exception):
    """The server cannot start (socket path in use, not a socket, ...)."""


class ErrorLog:
    """The error lines of one device's sessions, at most `burst` per `window` seconds.

    A hostile front-end, in one session or reconnecting, cannot flood the log: lines
    beyond the burst are counted, and the count is logged with the next error after
    the window, or at `flush`.
    """

    def __init__(self, name: str, burst: int = ERROR_BURST, window: float = ERROR_WINDOW) -> None:
        self.name = name
        self.burst = burst
        self.window = window
        self._window_start = -window
        self._logged = 0
        self._suppressed = 0

    def error(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self.window:
            self.flush()
            self._window_start, self._logged = now, 0
        if self._logged < self.burst:
            self._logged += 1
            log.error(msg, *args)
        else:
            self._suppressed += 1

    def flush(self) -> None:
        """Log how many lines were suppressed, if any."""
        if self._suppressed:
            log.error("%s: suppressed %d error messages", self.name, self._suppressed)
            self._suppressed = 0


@dataclass(frozen=True)
class WithFds:
    """A handler's result whose reply carries fds (they stay the handler's)."""

    result: object
    fds: tuple[int, ...]


class BackendLink:
    """The back-end channel of a session: the socket from SET_BACKEND_REQ_FD, driven
    through a sans-I/O `BackendChannel`, one request at a time."""

    def __init__(self, fd: int) -> None:
        try:
            raw = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise DeviceError(f"SET_BACKEND_REQ_FD: the fd is not a socket ({exc})") from None
        if raw.family != socket.AF_UNIX or raw.type != socket.SOCK_STREAM:
            raw.close()
            raise DeviceError("SET_BACKEND_REQ_FD: the fd is not a Unix stream socket")
        self.sock = trio.socket.from_stdlib_socket(raw)
        self.channel = BackendChannel()
        self._lock = trio.Lock()

    async def request(self, request: BackendRequest, *, need_reply: bool, timeout: float) -> bool:
        """Send `request`; with `need_reply`, wait up to `timeout` seconds for the
        front-end's answer and return whether it succeeded. Raises OSError (channel
        closed), trio.ClosedResourceError (closed here meanwhile), RemoteProtocolError
        (a garbled reply) or trio.TooSlowError: the link is then unusable."""
        async with self._lock:
            await send_with_fds(self.sock, self.channel.send(request, need_reply=need_reply))
            if not need_reply:
                return True
            with trio.fail_after(timeout):
                while (reply := self.channel.next_reply()) is None:
                    data, fds, _ = await recv_with_fds(self.sock)
                    if not data:
                        raise ConnectionResetError("the front-end closed the back-end channel")
                    self.channel.receive_data(data, fds)
            return reply.ok

    def close(self) -> None:
        self.sock.close()
        self.channel.close()


class Session:
    """One front-end connection to one device."""

    def __init__(
        self,
        device: Device,
        sock: trio.socket.SocketType,
        name: str,
        errors: ErrorLog,
        poll_max: float = POLL_MAX,
        trace: bool = False,
    ) -> None:
        self.device = device
        self.sock = sock
        self.name = name
        self.errors = errors
        self.poll_max = poll_max
        self.memory = GuestMemory()
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.status = 0
        self.conn = BackendConnection(
            features=device.features() | TRANSPORT_FEATURES | F_PROTOCOL_FEATURES | _LOG_FEATURES,
            protocol_features=protocol_features(device),
            num_queues=device.num_queues,
            max_queue_size=device.max_queue_size,
            max_mem_slots=MAX_MEM_SLOTS,
        )
        self._workers: QueueWorkers | None = None
        #: The INFLIGHT_SHMFD buffer the front-end asked for or handed back, if any.
        self.inflight: InflightBuffer | None = None
        #: The back-end channel, once the front-end sent SET_BACKEND_REQ_FD.
        self.backend_link: BackendLink | None = None
        #: The dirty log (SET_LOG_BASE), marked while VHOST_F_LOG_ALL is acked.
        self.log: DirtyLog | None = None
        self.logging = False
        #: SET_LOG_FD's eventfd: kept, never signalled (no front-end waits on it; QEMU
        #: 7.2 does not send it).
        self.log_fd: int | None = None
        self.trace = SessionTrace(name, (VirtioFeature,)) if trace else None

    async def run(self) -> None:
        """Serve the front-end until it disconnects or breaks the protocol."""
        try:
            async with trio.open_nursery() as nursery:
                self._workers = QueueWorkers(self.device, nursery, self.poll_max)
                token = trio.lowlevel.current_trio_token()
                self.memory.on_fault = lambda message: token.run_sync_soon(
                    self._on_memory_fault, message, nursery.cancel_scope
                )
                try:
                    await self._serve_messages()
                finally:
                    with trio.CancelScope(shield=True):
                        await self._stop_all()
                    nursery.cancel_scope.cancel()
        finally:
            self.conn.close()
            self._drop_backend_link()
            for vring in self.vrings:
                vring.close()
            self._set_inflight(None)
            self._set_log(None)
            self._set_log_fd(None)
            self.memory.close()
            # Unmaps the departed front-end's memory wherever else it is mapped (a
            # driver-domain child).
            with trio.CancelScope(shield=True):
                await self._memory_changed()
            self.device.reset()

    def _on_memory_fault(self, message: str, scope: trio.CancelScope) -> None:
        """Guest memory faulted (the front-end shrank its file): end this session."""
        log.error("%s: %s; session ended", self.name, message)
        scope.cancel()

    async def _serve_messages(self) -> None:
        while True:
            try:
                data, fds, truncated = await recv_message(self.sock)
            except OSError as exc:
                log.info("%s: front-end connection lost: %s", self.name, exc)
                return
            if not data or truncated:
                _close_all(fds)
                if data:
                    self.errors.error(
                        "%s: front-end sent more fds than a message may carry", self.name
                    )
                else:
                    log.info("%s: front-end disconnected", self.name)
                return
            if self.trace is not None:
                self.trace.received(data, fds, time.monotonic())
            self.conn.receive_data(data, fds)
            try:
                if not await self._process_events():
                    return
            except (BrokenPipeError, ConnectionResetError) as exc:
                log.info("%s: front-end disconnected before reading a reply: %s", self.name, exc)
                return

    async def _process_events(self) -> bool:
        """Handle every complete message received; False when the session must end."""
        while True:
            try:
                msg = self.conn.next_event()
            except RemoteProtocolError as exc:
                self.errors.error("%s: front-end protocol error: %s", self.name, exc)
                await self._send()
                if exc.fatal:
                    return False
                continue
            if msg is None:
                await self._send()
                return True
            try:
                result = await self._handle(msg)
            except (DeviceError, VirtioError, ProtocolError, OSError, ValueError) as exc:
                self.errors.error("%s: %s failed: %s", self.name, msg.request.name, exc)
                if not self.conn.fail(msg, str(exc)):
                    return False
            else:
                if isinstance(result, WithFds):
                    self.conn.complete(msg, result.result, result.fds)
                else:
                    self.conn.complete(msg, result)
            await self._send()

    async def _send(self) -> None:
        data, fds = self.conn.data_to_send(), self.conn.fds_to_send()
        if self.trace is not None and data:
            self.trace.sent(data, time.monotonic(), fds)
        await send_with_fds(self.sock, data, fds)

    # --- request handlers ------------------------------------------------------------

    async def _handle(self, msg: Message) -> object:
        handler = getattr(self, "_on_" + msg.request.name.lower(), None)
        if handler is None:
            return await self.device.handle_message(msg.request, msg.payload)
        return await handler(msg)

    async def _on_set_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, int)
        features = msg.payload & ~VHOST_F_LOG_ALL
        # QEMU switches logging on and off with SET_FEATURES while the rings run: the
        # device is only told when its own features change.
        if msg.payload ^ self.conn.acked_features != VHOST_F_LOG_ALL:
            self.device.set_features(features)
        self._set_logging(bool(msg.payload & VHOST_F_LOG_ALL))

    async def _on_reset_owner(self, msg: Message) -> None:
        await self._reset()

    async def _on_reset_device(self, msg: Message) -> None:
        await self._reset()

    async def _on_set_mem_table(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemoryTable)
        try:
            async with self._changing_memory():
                self.memory.clear()
                for region, fd in zip(msg.payload.regions, msg.fds, strict=True):
                    self.memory.add_region(
                        region.guest_phys_addr,
                        region.memory_size,
                        region.userspace_addr,
                        region.mmap_offset,
                        fd,
                    )
        finally:
            _close_all(msg.fds)

    def _known_region(self, update: MemoryRegionUpdate) -> bool:
        """Whether exactly this region is mapped already.

        QEMU 7.2 sends ADD_MEM_REG and REM_MEM_REG once per vhost device, and a
        multi-queue NIC has one per queue pair: repeats are not errors.
        """
        r = update.region
        key = (r.guest_phys_addr, r.memory_size, r.userspace_addr)
        return any((m.guest_phys_addr, m.size, m.user_addr) == key for m in self.memory.regions)

    async def _on_add_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemoryRegionUpdate)
        r = msg.payload.region
        try:
            if self._known_region(msg.payload):
                log.debug("%s: region %#x added again; ignored", self.name, r.guest_phys_addr)
                return
            if len(self.memory.regions) >= MAX_MEM_SLOTS:
                raise DeviceError(
                    f"region {r.guest_phys_addr:#x} refused: all {MAX_MEM_SLOTS} memory slots "
                    "(GET_MAX_MEM_SLOTS) are in use"
                )
            self.memory.add_region(
                r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, msg.fds[0]
            )
        finally:
            _close_all(msg.fds)
        await self._memory_changed()

    async def _on_rem_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemoryRegionUpdate)
        _close_all(msg.fds)
        r = msg.payload.region
        if not self._known_region(msg.payload):
            log.debug("%s: region %#x removed again; ignored", self.name, r.guest_phys_addr)
            return
        async with self._changing_memory():
            self.memory.remove_region(r.guest_phys_addr, r.memory_size, r.userspace_addr)

    async def _on_set_vring_num(self, msg: Message) -> None:
        vring = self._vring(msg.payload)
        vring.size = msg.payload.num  # type: ignore[union-attr]

    async def _on_set_vring_addr(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringAddress)
        vring = self._vring(msg.payload)
        vring.address = msg.payload
        if vring.running:  # QEMU sets VHOST_VRING_F_LOG this way as migration starts
            vring.set_log(vring.log)

    async def _on_set_vring_base(self, msg: Message) -> None:
        vring = self._vring(msg.payload)
        vring.base = msg.payload.num  # type: ignore[union-attr]

    async def _on_get_vring_base(self, msg: Message) -> VringState:
        vring = self._vring(msg.payload)
        await vring.stop()
        vring.set_kick(None)
        vring.started = False
        return VringState(vring.index, vring.base or 0)

    async def _on_set_vring_kick(self, msg: Message) -> None:
        vring = self._vring(msg.payload)
        await vring.stop()
        vring.set_kick(msg.fds[0] if msg.fds else None)
        vring.started = True
        if not self.conn.acked_features & F_PROTOCOL_FEATURES:
            vring.enabled = True
        await self._start(vring)

    async def _on_set_vring_call(self, msg: Message) -> None:
        self._vring(msg.payload).set_call(msg.fds[0] if msg.fds else None)

    async def _on_set_vring_err(self, msg: Message) -> None:
        self._vring(msg.payload).set_err(msg.fds[0] if msg.fds else None)

    async def _on_set_vring_enable(self, msg: Message) -> None:
        vring = self._vring(msg.payload)
        vring.enabled = bool(msg.payload.num)  # type: ignore[union-attr]
        if vring.enabled:
            await self._start(vring)
        else:
            await vring.stop()

    async def _on_get_config(self, msg: Message) -> bytes:
        assert isinstance(msg.payload, DeviceConfig)
        config = self.device.config()
        data = config[msg.payload.offset : msg.payload.offset + msg.payload.size]
        return data.ljust(msg.payload.size, b"\0")

    async def _on_set_config(self, msg: Message) -> None:
        assert isinstance(msg.payload, DeviceConfig)
        self.device.write_config(msg.payload.offset, msg.payload.data)

    async def _on_set_status(self, msg: Message) -> None:
        assert isinstance(msg.payload, int)
        self.status = msg.payload
        if self.status == 0:
            await self._stop_device()

    async def _on_get_status(self, msg: Message) -> int:
        return self.status

    async def _on_get_inflight_fd(self, msg: Message) -> WithFds:
        assert isinstance(msg.payload, InflightDescription)
        d = msg.payload
        async with self._stopped_vrings():
            self._set_inflight(InflightBuffer.create(d.num_queues, d.queue_size))
        assert self.inflight is not None
        reply = InflightDescription(self.inflight.mmap_size, 0, d.num_queues, d.queue_size)
        return WithFds(reply, (self.inflight.fd,))

    async def _on_set_inflight_fd(self, msg: Message) -> None:
        assert isinstance(msg.payload, InflightDescription)
        d = msg.payload
        try:
            buffer = InflightBuffer(
                msg.fds[0], d.mmap_size, d.mmap_offset, d.num_queues, d.queue_size
            )
        except BaseException:
            os.close(msg.fds[0])
            raise
        async with self._stopped_vrings():
            self._set_inflight(buffer)

    def _set_inflight(self, buffer: InflightBuffer | None) -> None:
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = buffer

    async def _on_set_log_base(self, msg: Message) -> int:
        assert isinstance(msg.payload, LogDescription)
        try:
            new = DirtyLog(msg.fds[0], msg.payload.mmap_size, msg.payload.mmap_offset)
        finally:
            os.close(msg.fds[0])
        try:
            for region in self.memory.regions:
                new.check(region.guest_phys_addr, region.size, "guest memory")
        except VirtioError:
            new.close()
            raise
        # Rings marking the old log stop first: once we answer, the front-end reads
        # the old log one last time and frees it.
        async with self._stopped_vrings() if self.logging else contextlib.nullcontext():
            self._set_log(new)  # the restarted rings take it (`_restart`)
        log.info("%s: dirty log of %d bytes", self.name, new.size)
        return 0

    def _set_log(self, dirty: DirtyLog | None) -> None:
        if self.log is not None:
            self.log.close()
        self.log = dirty

    async def _on_set_log_fd(self, msg: Message) -> None:
        self._set_log_fd(msg.fds[0])

    def _set_log_fd(self, fd: int | None) -> None:
        if self.log_fd is not None:
            os.close(self.log_fd)
        self.log_fd = fd

    def _ring_log(self) -> DirtyLog | None:
        """The log the rings mark now (None: the front-end is not migrating)."""
        return self.log if self.logging else None

    def _set_logging(self, on: bool) -> None:
        if on != self.logging:
            log.info("%s: dirty logging %s", self.name, "on" if on else "off")
        self.logging = on
        ring_log = self._ring_log()
        for vring in self.vrings:
            try:
                vring.set_log(ring_log)
            except VirtioError as exc:
                vring.fail(f"cannot log its writes: {exc}")

    async def _on_set_backend_req_fd(self, msg: Message) -> None:
        link = BackendLink(msg.fds[0])
        if self.backend_link is not None:
            log.info("%s: the front-end replaced the back-end channel", self.name)
        self._drop_backend_link()
        self.backend_link = link

    # --- the back-end channel --------------------------------------------------------

    async def config_changed(self, timeout: float = CONFIG_CHANGE_TIMEOUT) -> bool:
        """Send CONFIG_CHANGE_MSG (waiting for the ack with REPLY_ACK); whether the
        front-end took it. A front-end that cannot be told is logged, and the channel of
        one that broke it is closed; the session goes on either way."""
        link = self.backend_link
        if not self.conn.acked_protocol_features & ProtocolFeature.CONFIG:
            log.warning("%s: config changed; the front-end does not read it (no CONFIG)", self.name)
            return False
        if link is None:
            log.warning("%s: config changed; the front-end set up no back-end channel", self.name)
            return False
        try:
            ok = await link.request(
                BackendRequest.CONFIG_CHANGE_MSG, need_reply=self.conn.reply_ack, timeout=timeout
            )
        except trio.TooSlowError:
            reason = f"back-end channel: no acknowledgement in {timeout:g}s"
        except RemoteProtocolError as exc:
            reason = str(exc)
        except (OSError, trio.ClosedResourceError) as exc:
            reason = f"back-end channel: {exc or type(exc).__name__}"
        else:
            if not ok:
                self.errors.error("%s: the front-end failed CONFIG_CHANGE_MSG", self.name)
            return ok
        self.errors.error("%s: %s; channel closed", self.name, reason)
        if self.backend_link is link:
            self._drop_backend_link()
        return False

    def _drop_backend_link(self) -> None:
        if self.backend_link is not None:
            self.backend_link.close()
            self.backend_link = None

    # --- helpers ---------------------------------------------------------------------

    def _vring(self, payload: object) -> Vring:
        index = payload.index  # type: ignore[attr-defined]
        return self.vrings[index]

    async def _start(self, vring: Vring) -> None:
        if vring.ready and not vring.running and self.memory.regions:
            await self._restart(vring)

    async def _restart(self, vring: Vring) -> None:
        assert self._workers is not None
        inflight = self.inflight
        region = None
        if inflight is not None and vring.index < inflight.num_queues:
            region = inflight.region(vring.index)
        vring.log = self._ring_log()
        await vring.start(self._workers, self.memory, self.device.acked_features, region)

    async def _memory_changed(self) -> None:
        """Tell the device, in a thread: a driver-domain child maps the memory too, and
        other devices must not wait for that round trip."""
        await trio.to_thread.run_sync(self.device.memory_changed, self.memory)

    @contextlib.asynccontextmanager
    async def _changing_memory(self) -> AsyncIterator[None]:
        """Stop the running vrings while guest memory changes, then restart them.

        They restart even when the change failed half-way: a vring whose areas are no
        longer mapped fails alone (its err eventfd is signalled), the others go on.
        """
        async with self._stopped_vrings():
            try:
                yield
            finally:
                await self._memory_changed()

    @contextlib.asynccontextmanager
    async def _stopped_vrings(self) -> AsyncIterator[None]:
        """Stop the running vrings for a change, then restart them (a vring that cannot
        restart fails alone: its err eventfd is signalled, the others go on)."""
        running = [v for v in self.vrings if v.running]
        for vring in running:
            await vring.stop()
        try:
            yield
        finally:
            for vring in running:
                try:
                    await self._restart(vring)
                except VirtioError as exc:
                    vring.fail(f"cannot restart: {exc}")

    async def _stop_all(self) -> None:
        for vring in self.vrings:
            await vring.stop()

    async def _reset(self) -> None:
        await self._stop_all()
        for vring in self.vrings:
            vring.close()
        self.logging = False
        self.device.reset()

    async def _stop_device(self) -> None:
        """SET_STATUS 0: stop the rings and reset the device, but keep each ring's
        position for GET_VRING_BASE. QEMU 7.2 stops a device with SET_STATUS 0 first,
        then GET_VRING_BASE for each ring (`vhost_dev_stop`), and migrates that base."""
        await self._stop_all()
        for vring in self.vrings:
            vring.started = False  # serves again only once set up again (SET_VRING_KICK)
        self.device.reset()


class DeviceServer:
    """Serves one device on one vhost-user socket."""

    def __init__(
        self,
        device: Device,
        path: str | Path,
        *,
        client: bool = False,
        mode: int = 0o600,
        poll_max: float = POLL_MAX,
        trace: bool = False,
    ) -> None:
        self.device = device
        self.path = Path(path)
        #: Log every vhost-user message of the sessions, decoded (`vdev run --trace`).
        self.trace = trace
        self.client = client
        #: Longest adaptive spin of the queue workers (seconds; 0: never spin).
        self.poll_max = poll_max
        self.mode = mode
        self.sessions = 0
        self.errors = ErrorLog(str(self.path))
        #: The session of the front-end connected now, if any.
        self.session: Session | None = None
        #: One live change (resize, link) at a time.
        self._changing = trio.Lock()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve front-ends forever (until cancelled)."""
        try:
            if self.client:
                await self._serve_as_client(task_status)
            else:
                await self._serve_as_listener(task_status)
        finally:
            self.errors.flush()

    async def _serve_as_listener(self, task_status: trio.TaskStatus[None]) -> None:
        listener = await self._bind()
        idle = trio.Event()
        idle.set()
        try:
            with listener:
                log.info("%s: listening", self.path)
                task_status.started()
                async with trio.open_nursery() as nursery:
                    while True:
                        sock = await self._accept(listener)
                        # A front-end that reconnects may beat the old session's cleanup.
                        with trio.move_on_after(SESSION_END_GRACE):
                            await idle.wait()
                        if not idle.is_set():
                            log.warning("%s: refused a second front-end connection", self.path)
                            sock.close()
                            continue
                        idle = trio.Event()
                        nursery.start_soon(self._run_session, sock, idle)
        finally:
            self._unlink()

    async def _accept(self, listener: trio.socket.SocketType) -> trio.socket.SocketType:
        """The next connection; running out of fds or memory is waited out, logged once."""
        failing = False
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno not in _TRANSIENT_ACCEPT_ERRORS:
                    raise
                if not failing:
                    log.error("%s: cannot accept a front-end: %s; retrying", self.path, exc)
                    failing = True
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            if failing:
                log.info("%s: accepting front-ends again", self.path)
            return sock

    async def _serve_as_client(self, task_status: trio.TaskStatus[None]) -> None:
        started = False
        delay = 0.05
        while True:
            sock: trio.socket.SocketType | None = None
            try:
                sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                await sock.connect(str(self.path))
            except OSError as exc:
                if sock is not None:
                    sock.close()
                if not started:
                    task_status.started()
                    started = True
                log.debug("%s: connect failed (%s); retrying in %.2fs", self.path, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if not started:
                task_status.started()
                started = True
            delay = 0.05
            log.info("%s: connected to front-end", self.path)
            await self._run_session(sock)

    async def _run_session(
        self, sock: trio.socket.SocketType, done: trio.Event | None = None
    ) -> None:
        self.sessions += 1
        with sock:
            try:
                self.session = Session(
                    self.device, sock, str(self.path), self.errors, self.poll_max, self.trace
                )
                await self.session.run()
            except Exception:
                # A bug of ours must cost this session only, never the daemon.
                log.exception("%s: internal error; session dropped", self.path)
            finally:
                self.session = None  # the next session starts only after this
                if done is not None:
                    done.set()
        log.info("%s: device reset; waiting for the next front-end", self.path)

    # --- live changes (the control socket calls these) -------------------------------

    async def config_changed(self, timeout: float = CONFIG_CHANGE_TIMEOUT) -> bool:
        """Tell the front-end that the device's config space changed; whether it took
        the news (False, logged, when no front-end is connected or it cannot be told)."""
        session = self.session
        if session is None:
            log.info("%s: config changed; no front-end is connected", self.path)
            return False
        return await session.config_changed(timeout)

    async def resize(self, size: int) -> bool:
        """Give the disk `size` bytes and tell the front-end (see `config_changed`).

        ValueError, with a one-line reason, if the device or its backend cannot be
        resized or `size` is not a valid size for it.
        """
        resize = getattr(self.device, "resize", None)
        if resize is None:
            raise ValueError(f"{self.path}: a {type(self.device).__name__} cannot be resized")
        async with self._changing:
            await trio.to_thread.run_sync(resize, size)
            return await self.config_changed()

    async def set_link(self, up: bool) -> bool:
        """Set the NIC's link up or down and tell the front-end (see `config_changed`).

        ValueError if the device has no link, or its front-end does not read the config
        space over vhost-user (QEMU takes a vhost-user NIC's link state from its own
        netdev instead: QMP `set_link`).
        """
        set_link = getattr(self.device, "set_link", None)
        if set_link is None:
            raise ValueError(f"{self.path}: a {type(self.device).__name__} has no link")
        if not self.device.config_space:
            raise ValueError(
                f"{self.path}: the front-end keeps this NIC's link state itself (QEMU: QMP "
                "set_link); it is only settable with the NIC's config_space option"
            )
        async with self._changing:
            set_link(up)
            return await self.config_changed()

    async def _bind(self) -> trio.socket.SocketType:
        return await listen_unix(self.path, self.mode)

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def listen_unix(path: Path, mode: int = 0o600, backlog: int = 1) -> trio.socket.SocketType:
    """A Unix socket listening on `path`, replacing a stale socket, never a live one.

    The socket is bound, given `mode` and set listening in a private directory beside
    `path` (mode 0700: nobody reaches it meanwhile), then renamed into place, so that
    whoever sees `path` appear can connect at once, with `mode` already in force.
    """
    length = len(os.fsencode(path))
    if length > MAX_SOCKET_PATH:
        raise ServerError(
            f"cannot listen on {path}: AF_UNIX path too long "
            f"({length} bytes, at most {MAX_SOCKET_PATH})"
        )
    await _remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=".vdev-", dir=path.parent)) / "s"
        await sock.bind(str(staging))
        os.chmod(staging, mode)
        sock.listen(backlog)
        os.rename(staging, path)
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    finally:
        if staging is not None:
            with contextlib.suppress(OSError):
                staging.unlink()
            staging.parent.rmdir()
    return sock


async def _remove_stale_socket(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            await probe.connect(str(path))
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED:
                raise ServerError(f"cannot check {path}: {exc.strerror}") from exc
            log.info("%s: removing a stale socket", path)
            path.unlink()
            return
    raise ServerError(f"{path} is in use by a running vhost-user back-end")


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
