"""`vdev trace`: a vhost-user tracer between a front-end and a back-end.

The tracer listens where the front-end connects, opens one back-end connection per
front-end connection, forwards every message with its fds unchanged, both ways, and
writes each decoded (`vdev.protocol.describe`) as a line of text or JSON. It reads and
sends message by message, as the server does: the kernel hands a message's fds over
with the first read that reaches its bytes, and a larger read could take them early.
A stream whose framing is lost (absurd size) is reported and its pair closed; the
tracer keeps listening for the next front-end. The one fd not forwarded as is is the
back-end channel's socket (SET_BACKEND_REQ_FD): the back-end gets one end of a
socketpair instead, so that the channel is traced too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path
from typing import TextIO

import trio

from vdev.devices.blk import BlkFeature
from vdev.devices.net import NetFeature
from vdev.fdpass import recv_message, send_with_fds
from vdev.protocol import Request
from vdev.protocol.describe import Channel, Direction, Record, Trace
from vdev.server import listen_unix
from vdev.virtio.features import VirtioFeature

log = logging.getLogger(__name__)

#: Device types whose feature bits the tracer can name (`--device`).
DEVICE_FEATURES: dict[str, type[IntFlag]] = {"blk": BlkFeature, "net": NetFeature}

_SENDERS = {Direction.FRONTEND: "front-end", Direction.BACKEND: "back-end"}


class TraceError(Exception):
    """The tracer cannot start (a socket it cannot listen on or connect to) or write."""


@dataclass(frozen=True)
class TraceOptions:
    """What `vdev trace` was asked for."""

    listen: Path
    connect: Path
    output: TextIO
    json: bool = False
    only: frozenset[str] | None = None
    device: str | None = None

    @property
    def feature_types(self) -> tuple[type[IntFlag], ...]:
        device = (DEVICE_FEATURES[self.device],) if self.device else ()
        return (VirtioFeature, *device)


class Tracer:
    """Serves front-end connections in turn (or at once), each with its own back-end."""

    def __init__(self, options: TraceOptions) -> None:
        self.options = options
        self.connections = 0

    @property
    def path(self) -> Path:
        """The socket the front-ends connect to."""
        return self.options.listen

    async def check_backend(self) -> None:
        """Fail now if the back-end's socket does not accept connections."""
        sock = await self._connect_backend()
        sock.close()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept front-ends until cancelled."""
        listener = await listen_unix(self.options.listen)
        try:
            with listener:
                log.info("%s: tracing into %s", self.options.listen, self.options.connect)
                task_status.started()
                async with trio.open_nursery() as nursery:
                    while True:
                        front, _ = await listener.accept()
                        self.connections += 1
                        nursery.start_soon(self._serve_pair, front, self.connections)
        finally:
            self.options.listen.unlink(missing_ok=True)

    async def _connect_backend(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(str(self.options.connect))
        except OSError as exc:
            sock.close()
            raise TraceError(
                f"cannot connect to the back-end at {self.options.connect}: {exc.strerror}"
            ) from None
        return sock

    async def _serve_pair(self, front: trio.socket.SocketType, number: int) -> None:
        with front:
            try:
                back = await self._connect_backend()
            except TraceError as exc:
                log.error("connection %d: %s; front-end dropped", number, exc)
                return
            with back:
                log.info("connection %d: front-end connected", number)
                await self._forward(front, back, Trace(self.options.feature_types), number)
        log.info("connection %d: closed", number)

    async def _forward(
        self,
        front: trio.socket.SocketType,
        back: trio.socket.SocketType,
        trace: Trace,
        number: int,
    ) -> None:
        """Forward both ways until either side ends or loses its framing."""
        async with trio.open_nursery() as nursery:
            # Only the main channel's front-end hands a back-end channel over.
            channels = nursery if trace.channel is Channel.MAIN else None
            for src, dst, direction in (
                (front, back, Direction.FRONTEND),
                (back, front, Direction.BACKEND),
            ):
                nursery.start_soon(
                    self._pump, src, dst, direction, trace, number, nursery.cancel_scope, channels
                )

    async def _pump(
        self,
        src: trio.socket.SocketType,
        dst: trio.socket.SocketType,
        direction: Direction,
        trace: Trace,
        number: int,
        pair: trio.CancelScope,
        channels: trio.Nursery | None,
    ) -> None:
        """Forward ``direction`` until it ends; then the pair is closed.

        With ``channels``, a back-end channel the front-end hands over (the socket of
        SET_BACKEND_REQ_FD) is traced too: the back-end gets one end of a socketpair of
        ours instead, and the channel is forwarded in ``channels``.
        """
        sender = _SENDERS[direction]
        if trace.channel is Channel.BACKEND:
            sender += " (back-end channel)"
        try:
            while True:
                try:
                    data, fds, truncated = await recv_message(src)
                except OSError as exc:
                    log.info("connection %d: %s connection lost: %s", number, sender, exc)
                    return
                owned = forward = fds  # our copies of the fds, closed once forwarded
                try:
                    now = trio.current_time()
                    if not data:
                        self._emit(trace.close(direction, now), number)
                        log.info("connection %d: %s disconnected", number, sender)
                        return
                    records = trace.feed(direction, data, fds, now)
                    self._emit(records, number)
                    if truncated:
                        log.error("connection %d: %s sent more fds than fit", number, sender)
                        return
                    if channels is not None and _hands_over_channel(records):
                        replacement = self._trace_channel(fds[0], number, channels)
                        if replacement is not None:
                            forward, owned = [replacement], [*fds, replacement]
                    try:
                        await send_with_fds(dst, data, forward)
                    except OSError as exc:
                        log.info("connection %d: cannot forward: %s", number, exc)
                        return
                finally:
                    for fd in owned:
                        os.close(fd)
                if trace.lost(direction):
                    log.error("connection %d: %s framing lost; pair closed", number, sender)
                    return
        finally:
            pair.cancel()

    def _trace_channel(self, fd: int, number: int, nursery: trio.Nursery) -> int | None:
        """Start tracing the back-end channel on the front-end's socket ``fd`` (which it
        takes over); the fd to hand the back-end instead, None if ``fd`` is no socket."""
        try:
            front = socket.socket(fileno=os.dup(fd))
        except OSError as exc:
            log.warning("connection %d: back-end channel not traced: %s", number, exc)
            return None
        if front.family != socket.AF_UNIX or front.type != socket.SOCK_STREAM:
            front.close()
            log.warning("connection %d: back-end channel is no Unix stream socket", number)
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log.info("connection %d: tracing the back-end channel", number)
        nursery.start_soon(self._serve_channel, front, ours, number)
        return theirs.detach()

    async def _serve_channel(self, front: socket.socket, back: socket.socket, number: int) -> None:
        with trio.socket.from_stdlib_socket(front) as f, trio.socket.from_stdlib_socket(back) as b:
            await self._forward(f, b, Trace(self.options.feature_types, Channel.BACKEND), number)

    def _emit(self, records: Sequence[Record], number: int) -> None:
        """Write the records the filter keeps (errors always); a failed write ends the
        tracer (TraceError): it could only go on blind."""
        only = self.options.only
        out = self.options.output
        try:
            for record in records:
                if only is not None and record.name not in only and record.error is None:
                    continue
                if self.options.json:
                    out.write(json.dumps({"connection": number, **record.json()}) + "\n")
                else:
                    out.write(f"#{number} {record.text()}\n")
            out.flush()
        except OSError as exc:
            raise TraceError(f"cannot write the trace: {exc.strerror or exc}") from None


def _hands_over_channel(records: Sequence[Record]) -> bool:
    return any(
        r.name == Request.SET_BACKEND_REQ_FD.name and r.error is None and len(r.fds) == 1
        for r in records
    )
