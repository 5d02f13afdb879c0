"""Message framing: a 12-byte header (u32 request, u32 flags, u32 size), then the payload.

The reader accumulates stream bytes and the fds received with them and yields complete
raw messages. Fds received with a chunk belong to the first message whose header starts
at or after that chunk's first byte: the kernel delivers SCM_RIGHTS with the first
``recvmsg`` that reads the sender's ``sendmsg``, which starts with the message header.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .constants import VERSION_MASK, HeaderFlag, Request
from .errors import RemoteProtocolError

HEADER = struct.Struct("=III")
MAX_PAYLOAD_SIZE = 4096
"""Largest payload accepted; every defined message is well under 300 bytes."""


@dataclass(frozen=True)
class RawMessage:
    """A framed message, not yet interpreted."""

    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...]


def encode_message(request: int, flags: int, payload: bytes = b"") -> bytes:
    """Frame one message (fds, if any, travel separately as SCM_RIGHTS)."""
    return HEADER.pack(request, flags, len(payload)) + payload


def request_name(request: int) -> Request | None:
    """``request`` as a Request, or None when the number is unknown."""
    try:
        return Request(request)
    except ValueError:
        return None


class FrameReader:
    """Splits a byte stream (plus fds) into RawMessages."""

    def __init__(
        self, max_payload_size: int = MAX_PAYLOAD_SIZE, *, check_version: bool = True
    ) -> None:
        self._max_payload_size = max_payload_size
        self._check_version = check_version
        self._buffer = bytearray()
        self._offset = 0  # stream offset of self._buffer[0]
        self._fds: deque[tuple[int, tuple[int, ...]]] = deque()  # (chunk offset, fds)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add bytes and the fds received with them."""
        if fds:
            self._fds.append((self._offset + len(self._buffer), tuple(fds)))
        self._buffer += data

    def next_message(self) -> RawMessage | None:
        """The next complete message, or None if more bytes are needed.

        Raises a fatal RemoteProtocolError for a bad version (unless ``check_version``
        is off: a tracer reports it and reads on) or an absurd size; the reader stays in
        that state (the stream cannot be resynchronised).
        """
        if len(self._buffer) < HEADER.size:
            return None
        request, flags, size = HEADER.unpack_from(self._buffer)
        if self._check_version and flags & VERSION_MASK != HeaderFlag.VERSION:
            raise RemoteProtocolError(
                f"bad protocol version {flags & VERSION_MASK} in flags 0x{flags:x}",
                request=request_name(request),
            )
        if size > self._max_payload_size:
            raise RemoteProtocolError(
                f"payload size {size} exceeds {self._max_payload_size}",
                request=request_name(request),
            )
        end = HEADER.size + size
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size : end])
        fds: list[int] = []
        while self._fds and self._fds[0][0] <= self._offset:
            fds.extend(self._fds.popleft()[1])
        del self._buffer[:end]
        self._offset += end
        return RawMessage(request, flags, payload, tuple(fds))

    @property
    def buffered(self) -> bytes:
        """The bytes received but not yet returned as a message."""
        return bytes(self._buffer)

    def take_fds(self) -> list[int]:
        """Hand over every fd received but not yet attached to a returned message."""
        fds = [fd for _offset, chunk in self._fds for fd in chunk]
        self._fds.clear()
        return fds
