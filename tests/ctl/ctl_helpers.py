"""Helpers of the control-socket tests: a served disk with its control socket, an async
control client, and block requests."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from vdev.ctl.protocol import LineBuffer
from vdev.ctl.server import ControlServer, default_control_path, name_devices
from vdev.devices.base import Device
from vdev.devices.blk import REQUEST_HEADER, RequestType
from vdev.server import DeviceServer
from vdev.testing.frontend import FrontendQueue
from vdev.worker import POLL_MAX

SECTOR = 512


@asynccontextmanager
async def controlled(
    device: Device, directory: Path, *, poll_max: float = POLL_MAX, **control_options: Any
) -> AsyncIterator[tuple[DeviceServer, ControlServer]]:
    """`device` served on ``directory/disk0.sock`` (type blk), with a control socket;
    the device is closed at the end."""
    server = DeviceServer(device, directory / "disk0.sock", poll_max=poll_max)
    control = ControlServer(
        name_devices([("blk", server)]), default_control_path(server.path), **control_options
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve)
            await nursery.start(server.serve)
            yield server, control
            nursery.cancel_scope.cancel()
    finally:
        device.close()


async def connect(path: Path) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    return trio.SocketStream(sock)


class Replies:
    """The lines a control connection sends back, one at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._lines = LineBuffer(1 << 24)

    async def line(self, timeout: float = 10.0) -> bytes:
        """The next line, with its newline (b"" once the connection is closed)."""
        with trio.fail_after(timeout):
            while (line := self._lines.next_line()) is None:
                chunk = await self.stream.receive_some(1 << 16)
                if not chunk:
                    return b""
                self._lines.feed(chunk)
        return line + b"\n"

    async def reply(self) -> dict[str, Any]:
        reply = json.loads(await self.line())
        assert isinstance(reply, dict)
        return reply


async def ask(path: Path, request: dict[str, Any] | bytes) -> dict[str, Any]:
    """Send one request (a dict, or a raw line) on a new connection; the reply."""
    stream = await connect(path)
    async with stream:
        line = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
        await stream.send_all(line)
        return await Replies(stream).reply()


def read(sector: int) -> tuple[list[bytes], list[int]]:
    return [REQUEST_HEADER.pack(RequestType.IN, 0, sector)], [4096, 1]


def write(sector: int, data: bytes) -> tuple[list[bytes], list[int]]:
    return [REQUEST_HEADER.pack(RequestType.OUT, 0, sector), data], [1]


async def transact(queue: FrontendQueue, request: tuple[list[bytes], list[int]]) -> int:
    """Run one request; its status byte (FrontendError if it takes over 10 s)."""
    return (await queue.transact(*request)).last_byte
