"""The control protocol, sans-I/O: one JSON object per line each way.

Requests::

    {"cmd": "list"}
    {"cmd": "stats"}                      {"cmd": "stats", "device": NAME}
    {"cmd": "resize", "device": NAME, "size": "2G"}     (or a number of bytes)
    {"cmd": "link", "device": NAME, "up": true}

NAME is a device's name (`vdev ctl list` shows them) or its socket path. Replies are
``{"ok": true, ...}`` or ``{"ok": false, "error": "one line"}``. `parse_request` checks
a request completely (command, fields, types) before anything acts on it; `LineBuffer`
cuts a byte stream into lines of at most `MAX_LINE` bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vdev.units import parse_size

#: The longest request line, newline excluded.
MAX_LINE = 64 << 10


class RequestError(ValueError):
    """A request that is not valid: its message is the error reply."""


class LineTooLong(RequestError):
    """A line longer than `MAX_LINE` (the connection is then closed)."""


@dataclass(frozen=True)
class ListDevices:
    """``list``: every device and its state."""


@dataclass(frozen=True)
class Stats:
    """``stats``: the state and counters of `device` (None: of every device)."""

    device: str | None = None


@dataclass(frozen=True)
class Resize:
    """``resize``: give disk `device` `size` bytes."""

    device: str
    size: int


@dataclass(frozen=True)
class SetLink:
    """``link``: set NIC `device`'s link up or down."""

    device: str
    up: bool


Request = ListDevices | Stats | Resize | SetLink

#: Each command's fields: name -> (JSON types accepted, required).
_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "list": {},
    "stats": {"device": ((str,), False)},
    "resize": {"device": ((str,), True), "size": ((int, str), True)},
    "link": {"device": ((str,), True), "up": ((bool,), True)},
}
_TYPE_NAMES = {str: "a string", int: "a number", bool: "true or false"}


def parse_request(line: bytes) -> Request:
    """The request on `line` (without its newline); `RequestError` if it is not one."""
    try:
        message = json.loads(line)
    except ValueError as exc:  # bad JSON, bad UTF-8, a number of too many digits
        raise RequestError(f"not JSON: {exc}") from None
    except RecursionError:
        raise RequestError("not JSON: nested too deeply") from None
    if not isinstance(message, dict):
        raise RequestError("a request is a JSON object")
    cmd = message.get("cmd")
    if not isinstance(cmd, str):
        raise RequestError('a request needs "cmd", a string')
    fields = _FIELDS.get(cmd)
    if fields is None:
        raise RequestError(f"unknown command {cmd!r} (known: {', '.join(_FIELDS)})")
    args = {k: v for k, v in message.items() if k != "cmd"}
    if extra := sorted(args.keys() - fields.keys()):
        raise RequestError(f"{cmd}: unknown field(s) {', '.join(extra)}")
    for name, (types, required) in fields.items():
        if name not in args:
            if required:
                raise RequestError(f'{cmd}: "{name}" is required')
            continue
        value = args[name]
        # bool is an int to Python, not to JSON.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join(_TYPE_NAMES[t] for t in types)
            raise RequestError(f'{cmd}: "{name}" must be {expected}')
    return _build(cmd, args)


def _build(cmd: str, args: dict[str, Any]) -> Request:
    if cmd == "list":
        return ListDevices()
    if cmd == "stats":
        return Stats(args.get("device"))
    if cmd == "resize":
        try:
            size = parse_size(args["size"])
        except ValueError as exc:
            raise RequestError(f'resize: "size": {exc}') from None
        return Resize(args["device"], size)
    return SetLink(args["device"], args["up"])


def ok(**fields: object) -> bytes:
    """A success reply line."""
    return encode({"ok": True, **fields})


def error(message: str) -> bytes:
    """A failure reply line (`message` is made one line)."""
    return encode({"ok": False, "error": " ".join(message.split())})


def encode(message: dict[str, object]) -> bytes:
    """One JSON object and its newline."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class LineBuffer:
    """Cuts received bytes into lines (without their newline) of at most `limit` bytes."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._data = bytearray()

    @property
    def pending(self) -> bool:
        """Part of a line has arrived."""
        return bool(self._data)

    def feed(self, data: bytes) -> None:
        self._data += data

    def next_line(self) -> bytes | None:
        """The next complete line, or None; `LineTooLong` once a line exceeds the limit."""
        end = self._data.find(b"\n", 0, self.limit + 1)
        if end < 0:
            if len(self._data) > self.limit:
                raise LineTooLong(f"request longer than {self.limit} bytes")
            return None
        line = bytes(self._data[:end])
        del self._data[: end + 1]
        return line
