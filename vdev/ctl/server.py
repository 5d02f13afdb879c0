"""The control socket of a `vdev run` daemon: a trio server speaking `vdev.ctl.protocol`.

Every client gets its own task; requests on one connection are answered in order. A
bad request gets an error reply and changes nothing; a line over `MAX_LINE`, a line
left unfinished for `line_timeout` seconds or a client that does not read its replies
gets an error (if it can take one) and a closed connection. Nothing a client sends
stops the daemon or the other clients.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import trio

from vdev.ctl.protocol import (
    MAX_LINE,
    LineBuffer,
    LineTooLong,
    ListDevices,
    Request,
    RequestError,
    Resize,
    SetLink,
    Stats,
    error,
    ok,
    parse_request,
)
from vdev.ctl.snapshot import ManagedDevice, device_state
from vdev.server import DeviceServer, listen_unix

log = logging.getLogger(__name__)

#: Clients served at once; more are told so and closed.
MAX_CLIENTS = 64
#: Seconds a client has to finish a request line it started (and to take a reply).
LINE_TIMEOUT = 10.0
#: Seconds a connection may sit idle between requests.
IDLE_TIMEOUT = 600.0
#: Connections the kernel queues before we accept them (a burst of `vdev ctl` calls).
_BACKLOG = 128


def default_control_path(device_socket: Path) -> Path:
    """Where `vdev run` puts its control socket: ``<first device socket>.ctl``."""
    return device_socket.with_name(device_socket.name + ".ctl")


def name_devices(devices: Sequence[tuple[str, DeviceServer]]) -> list[ManagedDevice]:
    """(type, server) pairs named after their socket's file name without suffix
    (``disk0`` for ``/run/vdev/disk0.sock``), or the socket's path for names two
    sockets would share."""
    stems = Counter(server.path.stem for _, server in devices)
    return [
        ManagedDevice(
            server.path.stem if stems[server.path.stem] == 1 else str(server.path), kind, server
        )
        for kind, server in devices
    ]


class ControlServer:
    """Serves the control protocol for `devices` on a Unix socket at `path` (mode 0600)."""

    def __init__(
        self,
        devices: Sequence[ManagedDevice],
        path: Path,
        *,
        line_timeout: float = LINE_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.devices = list(devices)
        #: Each device by its name, its socket path as given and made absolute.
        self._by_name = {
            alias: managed
            for managed in self.devices
            for alias in (
                managed.name,
                str(managed.server.path),
                os.path.abspath(managed.server.path),
            )
        }
        self.path = path
        self.line_timeout = line_timeout
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self.clients = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve clients forever (until cancelled); the socket is removed at the end."""
        sock = await listen_unix(self.path, 0o600, backlog=_BACKLOG)
        try:
            log.info("%s: control socket listening", self.path)
            task_status.started()
            await trio.serve_listeners(self._serve_client, [trio.SocketListener(sock)])
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        try:
            if self.clients >= self.max_clients:
                await self._send(stream, error(f"too many control clients ({self.max_clients})"))
                return
            self.clients += 1
            try:
                await self._converse(stream)
            finally:
                self.clients -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("%s: internal error; control client dropped", self.path)

    async def _converse(self, stream: trio.SocketStream) -> None:
        lines = LineBuffer(MAX_LINE)
        #: When the unfinished line in `lines` began to arrive (None: nothing pending).
        started: float | None = None
        while True:
            try:
                line = lines.next_line()
            except LineTooLong as exc:
                await self._send(stream, error(f"{exc}; closing"))
                return
            if line is not None:
                if not await self._send(stream, await self.answer(line)):
                    return
                continue
            if not lines.pending:
                started = None
            elif started is None:
                started = trio.current_time()
            if started is None:
                deadline = trio.current_time() + self.idle_timeout
            else:
                deadline = started + self.line_timeout
            data = None
            with trio.move_on_at(deadline):
                data = await stream.receive_some(MAX_LINE)
            if not data:  # closed by the client, or timed out
                if data is None and started is not None:
                    message = f"request unfinished after {self.line_timeout:g}s; closing"
                    await self._send(stream, error(message))
                return
            lines.feed(data)

    async def _send(self, stream: trio.SocketStream, reply: bytes) -> bool:
        """Send a reply; False (the client is to be dropped) if it is not taken in time."""
        with trio.move_on_after(self.line_timeout):
            await stream.send_all(reply)
            return True
        return False

    async def answer(self, line: bytes) -> bytes:
        """The reply line to request `line`."""
        try:
            return await self._execute(parse_request(line))
        except ValueError as exc:  # a RequestError, or the device said no (resize, link)
            return error(str(exc))
        except Exception as exc:  # a bug (ours, or a plugin device's stats)
            log.exception("%s: internal error answering %r", self.path, line[:200])
            return error(f"internal error ({type(exc).__name__}: {exc}); see the daemon's log")

    async def _execute(self, request: Request) -> bytes:
        if isinstance(request, ListDevices):
            return ok(devices=[device_state(d) for d in self.devices])
        if isinstance(request, Stats):
            chosen = self.devices if request.device is None else [self._find(request.device)]
            return ok(devices=[device_state(d, counters=True) for d in chosen])
        managed = self._find(request.device)
        server = managed.server
        if isinstance(request, Resize):
            notified = await server.resize(request.size)
            return ok(device=managed.name, size=request.size, notified=notified)
        assert isinstance(request, SetLink)
        notified = await server.set_link(request.up)
        return ok(device=managed.name, up=request.up, notified=notified)

    def _find(self, name: str) -> ManagedDevice:
        if name in self._by_name:
            return self._by_name[name]
        known = ", ".join(d.name for d in self.devices)
        raise RequestError(f"unknown device {name!r} (devices: {known})")
