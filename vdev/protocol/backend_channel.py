"""The back-end channel (protocol feature BACKEND_REQ), sans-I/O.

The front-end hands the back-end one end of a socketpair with SET_BACKEND_REQ_FD. Over
it the back-end sends requests of its own (`BackendRequest`: CONFIG_CHANGE_MSG, ...);
when it sets NEED_REPLY (only once REPLY_ACK is negotiated) the front-end answers each
with a u64, 0 for success. `BackendChannel` is the back-end's end, `FrontendChannel`
the front-end's; neither does any I/O.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .constants import BackendRequest, HeaderFlag
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import FrameReader, RawMessage, encode_message
from .messages import U64, PayloadKind, decode_payload, encode_payload

#: The back-end requests implemented, and their payloads.
PAYLOADS: dict[BackendRequest, PayloadKind] = {BackendRequest.CONFIG_CHANGE_MSG: PayloadKind.NONE}
_REPLY_FLAGS = HeaderFlag.VERSION | HeaderFlag.REPLY


def _name(request: int) -> str:
    try:
        return BackendRequest(request).name
    except ValueError:
        return f"back-end request {request}"


@dataclass(frozen=True)
class BackendMessage:
    """A request on the back-end channel, as the front-end receives it."""

    request: BackendRequest
    flags: int
    payload: object = None

    @property
    def need_reply(self) -> bool:
        """Whether the back-end waits for an acknowledgement."""
        return bool(self.flags & HeaderFlag.NEED_REPLY)


@dataclass(frozen=True)
class BackendReply:
    """The front-end's answer to a back-end request: `result` 0 means success."""

    request: BackendRequest
    result: int

    @property
    def ok(self) -> bool:
        return self.result == 0


class _ChannelEnd:
    """Framing shared by both ends: bytes and fds in, framed messages out."""

    def __init__(self, *, close_fd: Callable[[int], None] = os.close) -> None:
        self._close_fd = close_fd
        self._reader = FrameReader()

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add bytes read from the channel socket and the fds received with them."""
        self._reader.feed(data, fds)

    def close(self) -> None:
        """Close the fds received but not handed out."""
        self._close_all(self._reader.take_fds())

    def _next_raw(self) -> RawMessage | None:
        try:
            raw = self._reader.next_message()
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"back-end channel: {exc.reason}") from None
        if raw is not None and raw.fds:
            self._close_all(raw.fds)
            raise RemoteProtocolError(f"back-end channel: {_name(raw.request)} carries fds")
        return raw

    def _close_all(self, fds: Iterable[int]) -> None:
        for fd in fds:
            self._close_fd(fd)


class BackendChannel(_ChannelEnd):
    """The back-end's end: encodes requests and checks the replies they get.

    A RemoteProtocolError from `next_reply` leaves the channel out of step with the
    front-end: the caller should close it.
    """

    def __init__(self, *, close_fd: Callable[[int], None] = os.close) -> None:
        super().__init__(close_fd=close_fd)
        self._expected: deque[BackendRequest] = deque()

    @property
    def pending_replies(self) -> int:
        """How many replies the requests sent so far still await."""
        return len(self._expected)

    def send(
        self, request: BackendRequest, payload: object = None, *, need_reply: bool = False
    ) -> bytes:
        """Encode a request; with `need_reply` its acknowledgement is then expected."""
        kind = PAYLOADS.get(request)
        if kind is None:
            raise LocalProtocolError(f"back-end request {request.name} is not implemented")
        try:
            body = encode_payload(kind, payload)
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(f"{request.name}: {exc}") from exc
        if need_reply:
            self._expected.append(request)
        flags = HeaderFlag.VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
        return encode_message(request, flags, body)

    def next_reply(self) -> BackendReply | None:
        """The next reply, or None when more data is needed (RemoteProtocolError if bad)."""
        raw = self._next_raw()
        if raw is None:
            return None
        if not self._expected:
            raise RemoteProtocolError(f"back-end channel: reply to no request ({raw.request})")
        request = self._expected.popleft()
        if raw.request != request:
            raise RemoteProtocolError(
                f"back-end channel: reply to {_name(raw.request)} for {request.name}"
            )
        if not raw.flags & HeaderFlag.REPLY:
            raise RemoteProtocolError(f"back-end channel: {request.name} reply flag missing")
        try:
            result = decode_payload(PayloadKind.U64, raw.payload)
        except ValueError as exc:
            raise RemoteProtocolError(f"back-end channel: {request.name} reply: {exc}") from None
        assert isinstance(result, int)
        return BackendReply(request, result)


class FrontendChannel(_ChannelEnd):
    """The front-end's end: decodes the back-end's requests and encodes replies."""

    def next_request(self) -> BackendMessage | None:
        """The next request, or None when more data is needed (RemoteProtocolError if bad)."""
        raw = self._next_raw()
        if raw is None:
            return None
        try:
            request = BackendRequest(raw.request)
            kind = PAYLOADS[request]
        except (ValueError, KeyError):
            raise RemoteProtocolError(f"back-end channel: unknown request {raw.request}") from None
        if raw.flags & HeaderFlag.REPLY:
            raise RemoteProtocolError(f"back-end channel: {request.name} has the reply flag")
        try:
            payload = decode_payload(kind, raw.payload)
        except ValueError as exc:
            raise RemoteProtocolError(f"back-end channel: {request.name}: {exc}") from None
        return BackendMessage(request, raw.flags, payload)

    def reply(self, msg: BackendMessage, result: int = 0) -> bytes:
        """The acknowledgement of `msg` (which must have asked for one): 0 for success."""
        if not msg.need_reply:
            raise LocalProtocolError(f"{msg.request.name} did not ask for a reply")
        try:
            body = U64.pack(result)
        except Exception as exc:
            raise LocalProtocolError(f"{msg.request.name}: bad result {result!r}") from exc
        return encode_message(msg.request, _REPLY_FLAGS, body)
