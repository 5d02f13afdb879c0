"""Control messages between the core and a driver domain: JSON objects with fds.

They travel on a SOCK_SEQPACKET socketpair (one message per datagram, fds riding
with it). A message with more fds than one datagram may carry (SCM_MAX_FD) is
preceded by `fds` datagrams carrying the first ones; `receive` joins them. JSON, not
pickle: the core must never run code the child chose. The data path never uses this
socket.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
from collections.abc import Sequence
from typing import Any

#: The kernel's limit of fds per datagram (SCM_MAX_FD).
MAX_FDS = 253
#: The limit of fds per message, over all its datagrams (more than vhost-user's slots).
MAX_MESSAGE_FDS = 1024
#: The datagram that carries a message's leading fds.
_FDS = b'{"op": "fds"}'
MAX_MESSAGE = 1 << 18
_INT = array.array("i").itemsize


class ControlError(Exception):
    """The other side closed the socket, sent garbage, or did not answer in time."""


def socketpair() -> tuple[socket.socket, socket.socket]:
    """(core end, child end); both close-on-exec (the child's is passed explicitly)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message (blocking), in several datagrams if it has many fds."""
    if len(fds) > MAX_MESSAGE_FDS:
        raise ControlError(f"{len(fds)} fds are too many for one message ({MAX_MESSAGE_FDS})")
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE:
        raise ControlError(f"control message of {len(data)} bytes is too large")
    chunks = [fds[i : i + MAX_FDS] for i in range(0, len(fds), MAX_FDS)] or [()]
    try:
        for chunk in chunks[:-1]:
            _send(sock, _FDS, chunk)
        _send(sock, data, chunks[-1])
    except OSError as exc:
        raise ControlError(f"cannot send {message.get('op')!r}: {exc.strerror}") from exc


def _send(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def receive(
    sock: socket.socket, timeout: float | None = None, *, abort_fds: Sequence[int] = ()
) -> tuple[dict[str, Any], list[int]]:
    """Receive one message and its fds. `timeout` in seconds (None: wait forever);
    any of `abort_fds` readable (a child's pidfd, a stop signal) ends the wait first,
    with ControlError."""
    fds: list[int] = []
    try:
        while True:
            message, more = _receive(sock, timeout, abort_fds)
            fds += more
            if len(fds) > MAX_MESSAGE_FDS:
                raise ControlError(f"a control message carried more than {MAX_MESSAGE_FDS} fds")
            if message["op"] != "fds":
                return message, fds
    except ControlError:
        close_fds(fds)
        raise


def _receive(
    sock: socket.socket, timeout: float | None, abort_fds: Sequence[int]
) -> tuple[dict[str, Any], list[int]]:
    """One datagram: its message and fds."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    for fd in abort_fds:
        poller.register(fd, select.POLLIN)
    ready = poller.poll(None if timeout is None else int(timeout * 1000))
    if not ready:
        raise ControlError(f"no answer within {timeout:g}s")
    if any(fd in abort_fds for fd, _ in ready):
        raise ControlError("the wait was aborted (the other side exited, or we are stopping)")
    try:
        data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * _INT))
    except OSError as exc:
        raise ControlError(f"receive failed: {exc.strerror}") from exc
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _INT])
    try:
        if not data:
            raise ControlError("the other side closed the control socket")
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise ControlError("a control message was truncated")
        try:
            message = json.loads(data)
        except ValueError as exc:
            raise ControlError(f"malformed control message: {exc}") from exc
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise ControlError(f"malformed control message {data[:80]!r}")
    except ControlError:
        close_fds(fds)
        raise
    return message, list(fds)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
