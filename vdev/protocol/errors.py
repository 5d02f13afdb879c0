"""Protocol errors that say whose fault they are (h11 style)."""

from __future__ import annotations

from .constants import Request


class ProtocolError(Exception):
    """A vhost-user protocol violation; ``request`` names the message when known."""

    def __init__(self, reason: str, *, request: Request | None = None) -> None:
        self.reason = reason
        self.request = request
        super().__init__(f"{request.name}: {reason}" if request is not None else reason)


class LocalProtocolError(ProtocolError):
    """Our side misused the API (a bug in the caller, never the peer's fault)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid.

    ``fatal`` is False when a failure reply was queued and the session can go on, True
    when the caller must drop the connection.
    """

    def __init__(self, reason: str, *, request: Request | None = None, fatal: bool = True) -> None:
        super().__init__(reason, request=request)
        self.fatal = fatal
