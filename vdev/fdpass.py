"""Sending and receiving bytes with file descriptors over a trio Unix socket."""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence

import trio

from vdev.protocol import MAX_FDS

_INT = array.array("i").itemsize
#: Ancillary buffer for one vhost-user message's worth of fds.
ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * _INT)


async def recv_with_fds(
    sock: trio.socket.SocketType, size: int = 65536
) -> tuple[bytes, list[int], bool]:
    """Receive bytes and the fds sent with them; the flag says fds were truncated."""
    data, ancdata, flags, _ = await sock.recvmsg(size, ANC_SIZE)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _INT])
    return data, list(fds), bool(flags & socket.MSG_CTRUNC)


async def send_with_fds(sock: trio.socket.SocketType, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send all of `data`, the fds riding with its first byte."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    view = memoryview(data)
    while view:
        sent = await sock.sendmsg([view], anc)
        view, anc = view[sent:], []
