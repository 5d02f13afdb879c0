"""Sending and receiving bytes with file descriptors over a trio Unix socket."""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence

import trio

from vdev.protocol import MAX_FDS
from vdev.protocol.framing import HEADER, MAX_PAYLOAD_SIZE

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


async def recv_message(sock: trio.socket.SocketType) -> tuple[bytes, list[int], bool]:
    """Receive one vhost-user message: its header (with the fds sent alongside), then
    its payload. Reading message by message keeps every fd with its own message, as the
    kernel hands fds over with the first read of the data they were sent with.
    Returns (b"", [], False) at end of stream; a short final message is returned as is.
    """
    header, fds, truncated = await _recv_exactly(sock, HEADER.size, with_fds=True)
    if len(header) < HEADER.size:
        return header, fds, truncated
    size = HEADER.unpack(header)[2]
    if size > MAX_PAYLOAD_SIZE:  # garbage: let the protocol reject the header at once
        return header, fds, truncated
    payload, _, _ = await _recv_exactly(sock, size, with_fds=False)
    return header + payload, fds, truncated


async def _recv_exactly(
    sock: trio.socket.SocketType, size: int, *, with_fds: bool
) -> tuple[bytes, list[int], bool]:
    data = b""
    fds: list[int] = []
    truncated = False
    while len(data) < size:
        if with_fds:
            chunk, more, trunc = await recv_with_fds(sock, size - len(data))
            fds += more
            truncated |= trunc
        else:
            chunk = await sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data, fds, truncated


async def send_with_fds(sock: trio.socket.SocketType, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send all of `data`, the fds riding with its first byte."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    view = memoryview(data)
    while view:
        sent = await sock.sendmsg([view], anc)
        view, anc = view[sent:], []
