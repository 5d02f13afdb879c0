"""Decoded descriptions of vhost-user messages for tracers, sans-I/O.

A `Describer` reads one direction of one channel (bytes and fds in, `Record`s out) and
never judges a session the way `BackendConnection` does: it names what was sent, field
by field, and turns whatever does not parse into an error record holding the raw bytes.
A `Trace` pairs the two directions of a connection and stamps each record with the time
since the previous message. Nothing here owns the fds it is shown: they are numbers.
"""

from __future__ import annotations

import logging
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum, IntEnum, IntFlag

from .constants import (
    F_PROTOCOL_FEATURES,
    VERSION_MASK,
    VHOST_F_LOG_ALL,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    ConfigType,
    HeaderFlag,
    ProtocolFeature,
    Request,
)
from .errors import RemoteProtocolError
from .framing import HEADER, FrameReader, RawMessage
from .messages import (
    U64,
    DeviceConfig,
    InflightDescription,
    LogDescription,
    MemoryRegion,
    MemoryRegionUpdate,
    MemoryTable,
    PayloadKind,
    VringAddress,
    VringFile,
    VringState,
    decode_payload,
)
from .rules import RULES

logger = logging.getLogger(__name__)

#: Most raw bytes an error record keeps (a lost stream may hold many more).
MAX_RAW = 256


class Direction(Enum):
    """Who sent a message."""

    FRONTEND = "front-end -> back-end"
    BACKEND = "back-end -> front-end"


class Channel(Enum):
    """Which socket carried it: the front-end's, or the one SET_BACKEND_REQ_FD hands over
    (requests from the back-end, replies from the front-end)."""

    MAIN = "main"
    BACKEND = "back-end channel"


class VhostFeature(IntFlag):
    """The virtio feature bits vhost-user itself defines."""

    LOG_ALL = VHOST_F_LOG_ALL
    PROTOCOL_FEATURES = F_PROTOCOL_FEATURES


class DeviceStatus(IntFlag):
    """Virtio device status bits (SET_STATUS / GET_STATUS)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class Hex(int):
    """An address, size or offset: shown in hex."""


@dataclass(frozen=True)
class FlagSet:
    """A bit mask and the names of its bits (``bitN`` for bits nobody named)."""

    value: int
    names: tuple[str, ...]

    @classmethod
    def of(cls, value: int, flag_types: Iterable[type[IntFlag]]) -> FlagSet:
        """``value``'s bits named by the first of ``flag_types`` that names each."""
        known: dict[int, str] = {}
        for flag_type in flag_types:
            for name, member in flag_type.__members__.items():
                known.setdefault(member.value, name)
        bits = (1 << bit for bit in range(value.bit_length()) if value >> bit & 1)
        return cls(value, tuple(known.get(b, f"bit{b.bit_length() - 1}") for b in bits))


Value = int | str | bool | bytes | FlagSet | tuple[dict[str, object], ...] | None
Fields = dict[str, Value]


@dataclass(frozen=True)
class Record:
    """One message as a tracer shows it; ``error`` says what was wrong with it.

    ``raw`` holds the message's bytes (at most MAX_RAW) when it did not decode.
    ``elapsed`` is the time since the previous message on the connection, if any.
    """

    direction: Direction
    channel: Channel
    request: int
    name: str
    flags: int
    size: int
    fields: Fields = field(default_factory=dict)
    fds: tuple[int, ...] = ()
    error: str | None = None
    raw: bytes = b""
    elapsed: float | None = None

    @property
    def flag_names(self) -> tuple[str, ...]:
        """REPLY, NEED_REPLY and any reserved bits that are set (the version aside)."""
        rest = self.flags & ~VERSION_MASK
        names = [f.name for f in (HeaderFlag.REPLY, HeaderFlag.NEED_REPLY) if rest & f]
        if unknown := rest & ~int(HeaderFlag.REPLY | HeaderFlag.NEED_REPLY):
            names.append(f"0x{unknown:x}")
        return tuple(names)

    def text(self) -> str:
        """One line: elapsed time, direction, request, flags, fields, fds, error."""
        parts = [
            "+?" if self.elapsed is None else f"+{self.elapsed:.6f}s",
            self.direction.value,
        ]
        if self.channel is Channel.BACKEND:
            parts.append(f"[{self.channel.value}]")
        parts.append(self.name)
        if self.flag_names:
            parts.append("[" + "|".join(self.flag_names) + "]")
        parts += [f"{key}={_text(value)}" for key, value in self.fields.items()]
        if self.fds:
            parts.append(f"fds={len(self.fds)}:" + ",".join(map(str, self.fds)))
        if self.error is not None:
            parts.append(f"ERROR: {self.error}; raw={self.raw.hex()}")
        return " ".join(parts)

    def json(self) -> dict[str, object]:
        """The record as plain JSON types."""
        out: dict[str, object] = {
            "elapsed": self.elapsed,
            "direction": self.direction.value,
            "channel": self.channel.value,
            "request": self.name,
            "code": self.request,
            "flags": list(self.flag_names),
            "size": self.size,
            "fields": {key: _json(value) for key, value in self.fields.items()},
            "fds": list(self.fds),
        }
        if self.error is not None:
            out["error"] = self.error
            out["raw"] = self.raw.hex()
        return out


def _text(value: Value | object) -> str:
    match value:
        case Hex():
            return f"0x{value:x}"
        case bytes():
            return value.hex() or "''"
        case FlagSet(value=bits, names=names):
            return f"0x{bits:x}<{'|'.join(names)}>"
        case tuple():
            return "[" + "; ".join(_text(item) for item in value) + "]"
        case dict():
            return " ".join(f"{key}={_text(item)}" for key, item in value.items())
    return str(value)


def _json(value: Value | object) -> object:
    match value:
        case Hex():
            return f"0x{value:x}"
        case bytes():
            return value.hex()
        case FlagSet(value=bits, names=names):
            return {"value": f"0x{bits:x}", "names": list(names)}
        case tuple():
            return [_json(item) for item in value]
        case dict():
            return {key: _json(item) for key, item in value.items()}
    return value


# --- payload layouts ---------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What names the bits of a u64: the virtio feature types the tracer knows."""

    feature_types: tuple[type[IntFlag], ...]


Layout = Callable[[Request | BackendRequest | int, bytes, Context], Fields]


def _region(region: MemoryRegion) -> dict[str, object]:
    return {
        "guest_addr": Hex(region.guest_phys_addr),
        "size": Hex(region.memory_size),
        "user_addr": Hex(region.userspace_addr),
        "mmap_offset": Hex(region.mmap_offset),
    }


#: The name of a VringState's ``num`` in each request.
_VRING_NUM_NAMES = {
    Request.SET_VRING_NUM: "size",
    Request.SET_VRING_BASE: "base",
    Request.GET_VRING_BASE: "base",
    Request.SET_VRING_ENABLE: "enable",
    Request.SET_VRING_ENDIAN: "big_endian",
}
#: The name (and bit names) of a u64 in each request or its reply.
_U64_NAMES: dict[int, tuple[str, Callable[[Context], tuple[type[IntFlag], ...]] | None]] = {
    Request.GET_FEATURES: ("features", lambda ctx: (VhostFeature, *ctx.feature_types)),
    Request.SET_FEATURES: ("features", lambda ctx: (VhostFeature, *ctx.feature_types)),
    Request.GET_PROTOCOL_FEATURES: ("protocol_features", lambda _ctx: (ProtocolFeature,)),
    Request.SET_PROTOCOL_FEATURES: ("protocol_features", lambda _ctx: (ProtocolFeature,)),
    Request.SET_STATUS: ("status", lambda _ctx: (DeviceStatus,)),
    Request.GET_STATUS: ("status", lambda _ctx: (DeviceStatus,)),
    Request.GET_QUEUE_NUM: ("queues", None),
    Request.GET_MAX_MEM_SLOTS: ("slots", None),
    Request.NET_SET_MTU: ("mtu", None),
}
_U64_DEFAULT: tuple[str, None] = ("value", None)


def _kind_layout(kind: PayloadKind) -> Layout:
    """A layout decoded by the protocol layer's own payload codecs."""

    def layout(request: Request | BackendRequest | int, data: bytes, ctx: Context) -> Fields:
        payload = decode_payload(kind, data)
        main = isinstance(request, Request)  # back-end request numbers overlap these
        match payload:
            case None:
                return {}
            case int(value):
                name, types = _U64_NAMES.get(request, _U64_DEFAULT) if main else _U64_DEFAULT
                return {name: FlagSet.of(value, types(ctx)) if types else value}
            case bytes(mac):
                return {"mac": ":".join(f"{b:02x}" for b in mac)}
            case VringState(index=index, num=num):
                return {"index": index, (main and _VRING_NUM_NAMES.get(request)) or "num": num}
            case VringAddress() as a:
                return {
                    "index": a.index,
                    "flags": a.flags,
                    "desc": Hex(a.desc_user_addr),
                    "used": Hex(a.used_user_addr),
                    "avail": Hex(a.avail_user_addr),
                    "log": Hex(a.log_guest_addr),
                }
            case VringFile(index=index, fd_present=present):
                return {"index": index, "fd": present}
            case MemoryTable(regions=regions):
                return {"regions": tuple(_region(r) for r in regions)}
            case MemoryRegionUpdate(region=region):
                return _region(region)
            case DeviceConfig(offset=offset, size=size, flags=flags, data=config):
                known = flags in ConfigType.__members__.values()
                return {
                    "offset": offset,
                    "size": size,
                    "flags": ConfigType(flags).name if known else flags,
                    "data": config,
                }
            case LogDescription() as log:
                return {"mmap_size": hex(log.mmap_size), "mmap_offset": hex(log.mmap_offset)}
            case InflightDescription() as d:
                return {
                    "mmap_size": hex(d.mmap_size),
                    "mmap_offset": hex(d.mmap_offset),
                    "num_queues": d.num_queues,
                    "queue_size": d.queue_size,
                }
        raise AssertionError(f"no description for {payload!r}")

    return layout


def _ack(request: Request | BackendRequest | int, data: bytes, ctx: Context) -> Fields:
    """A REPLY_ACK reply: 0 is success."""
    if len(data) != U64.size:
        raise ValueError(f"payload is {len(data)} bytes, expected {U64.size}")
    (value,) = U64.unpack(data)
    return {"ack": "ok" if value == 0 else f"failed ({value})"}


def _struct_layout(fmt: str, *names: str, hex_names: Sequence[str] = ()) -> Layout:
    """A payload that is one struct this package does not otherwise implement."""
    layout_struct = struct.Struct(fmt)

    def layout(request: Request | BackendRequest | int, data: bytes, ctx: Context) -> Fields:
        if len(data) != layout_struct.size:
            raise ValueError(f"payload is {len(data)} bytes, expected {layout_struct.size}")
        values = layout_struct.unpack(data)
        return {
            name: Hex(value) if name in hex_names else value
            for name, value in zip(names, values, strict=True)
        }

    return layout


def _vring_area(request: Request | BackendRequest | int, data: bytes, ctx: Context) -> Fields:
    fields = _struct_layout("=QQQ", "index", "size", "offset", hex_names=("size", "offset"))(
        request, data, ctx
    )
    index = int(fields["index"])  # type: ignore[arg-type]
    return {**fields, "index": index & VRING_IDX_MASK, "fd": not index & VRING_NOFD_MASK}


def _uuid(request: Request | BackendRequest | int, data: bytes, ctx: Context) -> Fields:
    if len(data) != 16:
        raise ValueError(f"payload is {len(data)} bytes, expected 16")
    return {"uuid": str(uuid.UUID(bytes=data))}


def _raw(request: Request | BackendRequest | int, data: bytes, ctx: Context) -> Fields:
    """A payload whose layout is not described: its bytes."""
    return {"payload": data} if data else {}


_KIND_LAYOUTS = {kind: _kind_layout(kind) for kind in PayloadKind}
_NONE = _KIND_LAYOUTS[PayloadKind.NONE]
_VRING_STATE = _KIND_LAYOUTS[PayloadKind.VRING_STATE]
_U64 = _KIND_LAYOUTS[PayloadKind.U64]


def _config_reply(request: Request | BackendRequest | int, data: bytes, ctx: Context) -> Fields:
    """GET_CONFIG's reply: an empty one is the back-end's error reply."""
    if not data:
        return {"failed": True}
    return _KIND_LAYOUTS[PayloadKind.DEVICE_CONFIG](request, data, ctx)


_IOTLB = _struct_layout(
    "=QQQBB6x", "iova", "size", "user_addr", "perm", "type", hex_names=("iova", "size", "user_addr")
)

#: Requests the protocol layer does not implement, with (request, reply) layouts.
_EXTRA_REQUESTS: dict[Request, tuple[Layout, Layout]] = {
    Request.SET_VRING_ENDIAN: (_VRING_STATE, _ack),
    Request.IOTLB_MSG: (_IOTLB, _ack),
    Request.GET_SHARED_OBJECT: (_uuid, _U64),
    Request.SET_DEVICE_STATE_FD: (_struct_layout("=II", "direction", "phase"), _U64),
    Request.CHECK_DEVICE_STATE: (_NONE, _U64),
}
#: The back-end channel's requests, with (request, reply) layouts.
_BACKEND_REQUESTS: dict[BackendRequest, tuple[Layout, Layout]] = {
    BackendRequest.IOTLB_MSG: (_IOTLB, _ack),
    BackendRequest.CONFIG_CHANGE_MSG: (_NONE, _ack),
    BackendRequest.VRING_HOST_NOTIFIER_MSG: (_vring_area, _ack),
    BackendRequest.VRING_CALL: (_VRING_STATE, _ack),
    BackendRequest.VRING_ERR: (_VRING_STATE, _ack),
    BackendRequest.SHARED_OBJECT_ADD: (_uuid, _ack),
    BackendRequest.SHARED_OBJECT_REMOVE: (_uuid, _ack),
    BackendRequest.SHARED_OBJECT_LOOKUP: (_uuid, _ack),
}


def request_type(channel: Channel, number: int) -> Request | BackendRequest | None:
    """The request ``number`` names on ``channel``, or None when it names none."""
    types: type[IntEnum] = Request if channel is Channel.MAIN else BackendRequest
    try:
        return types(number)  # type: ignore[return-value]
    except ValueError:
        return None


def known_request_names() -> frozenset[str]:
    """Every request name a record can carry (for a tracer's filter)."""
    return frozenset(Request.__members__) | frozenset(BackendRequest.__members__)


def _layout(channel: Channel, request: Request | BackendRequest, reply: bool) -> Layout:
    if channel is Channel.BACKEND:
        assert isinstance(request, BackendRequest)
        return _BACKEND_REQUESTS[request][reply]
    assert isinstance(request, Request)
    rule = RULES.get(request)
    if rule is None:
        return _EXTRA_REQUESTS.get(request, (_raw, _raw))[reply]
    if not reply:
        return _KIND_LAYOUTS[rule.payload]
    if rule.reply is PayloadKind.DEVICE_CONFIG:
        return _config_reply
    if request is Request.SET_LOG_BASE:
        return _ack  # its reply is always sent, but reads as an ack
    return _ack if rule.reply is None else _KIND_LAYOUTS[rule.reply]


class Describer:
    """One direction of one channel: bytes and fds in, Records out.

    When the framing is lost (an absurd size) the describer reports it once and then
    stays ``lost``: the stream cannot be resynchronised.
    """

    def __init__(
        self,
        direction: Direction,
        channel: Channel = Channel.MAIN,
        feature_types: Sequence[type[IntFlag]] = (),
    ) -> None:
        self.direction = direction
        self.channel = channel
        self._context = Context(tuple(feature_types))
        self._reader = FrameReader(check_version=False)
        self.lost = False

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Record]:
        """Describe every message completed by ``data`` (and the fds received with it)."""
        if self.lost:
            return []
        self._reader.feed(data, fds)
        records = []
        while True:
            try:
                raw = self._reader.next_message()
            except RemoteProtocolError as exc:
                self.lost = True
                records.append(self._broken(f"framing lost: {exc.reason}"))
                return records
            if raw is None:
                return records
            records.append(self.describe(raw))

    def close(self) -> list[Record]:
        """The end of the stream: a message cut short is reported."""
        if self.lost or not self._reader.buffered:
            return []
        self.lost = True
        return [self._broken(f"stream ended inside a message ({len(self._reader.buffered)} bytes)")]

    def describe(self, raw: RawMessage) -> Record:
        """The record of one framed message."""
        request = request_type(self.channel, raw.request)
        reply = bool(raw.flags & HeaderFlag.REPLY)
        record = Record(
            self.direction,
            self.channel,
            raw.request,
            request.name if request is not None else f"UNKNOWN({raw.request})",
            raw.flags,
            len(raw.payload),
            fds=raw.fds,
        )
        whole = HEADER.pack(raw.request, raw.flags, len(raw.payload)) + raw.payload
        if (error := self._header_error(request, raw.flags)) is not None:
            return replace(record, error=error, raw=whole[:MAX_RAW])
        assert request is not None
        try:
            fields = _layout(self.channel, request, reply)(request, raw.payload, self._context)
        except ValueError as exc:
            return replace(record, error=str(exc), raw=whole[:MAX_RAW])
        return replace(record, fields=fields)

    def _header_error(self, request: object, flags: int) -> str | None:
        if flags & VERSION_MASK != HeaderFlag.VERSION:
            return f"bad protocol version {flags & VERSION_MASK} in flags 0x{flags:x}"
        if request is None:
            return f"unknown request on the {self.channel.value} channel"
        requests_from = Direction.FRONTEND if self.channel is Channel.MAIN else Direction.BACKEND
        if bool(flags & HeaderFlag.REPLY) == (self.direction is requests_from):
            sender = "front-end" if self.direction is Direction.FRONTEND else "back-end"
            kind = "reply" if flags & HeaderFlag.REPLY else "request"
            return f"a {kind} from the {sender} on the {self.channel.value} channel"
        return None

    def _broken(self, error: str) -> Record:
        """An error record for bytes that do not frame."""
        data = self._reader.buffered
        request, flags, size = HEADER.unpack_from(data) if len(data) >= HEADER.size else (0, 0, 0)
        known = request_type(self.channel, request) if len(data) >= HEADER.size else None
        name = known.name if known is not None else "GARBAGE"
        fds = tuple(self._reader.take_fds())
        return Record(
            self.direction, self.channel, request, name, flags, size, fds=fds, error=error,
            raw=data[:MAX_RAW],
        )  # fmt: skip


class Trace:
    """Both directions of one connection, each record stamped with the time since the
    previous message (either way). Times are given by the caller."""

    def __init__(
        self, feature_types: Sequence[type[IntFlag]] = (), channel: Channel = Channel.MAIN
    ) -> None:
        self.channel = channel
        self._describers = {d: Describer(d, channel, feature_types) for d in Direction}
        self._last: float | None = None

    def lost(self, direction: Direction) -> bool:
        """Whether the framing of ``direction`` is lost (or its stream ended mid-message)."""
        return self._describers[direction].lost

    def feed(
        self, direction: Direction, data: bytes, fds: Sequence[int], now: float
    ) -> list[Record]:
        """The records ``data`` completes in ``direction``."""
        return self._stamp(self._describers[direction].feed(data, fds), now)

    def close(self, direction: Direction, now: float) -> list[Record]:
        """``direction`` ended: a message it cut short is reported."""
        return self._stamp(self._describers[direction].close(), now)

    def _stamp(self, records: list[Record], now: float) -> list[Record]:
        stamped = []
        for record in records:
            elapsed = None if self._last is None else now - self._last
            self._last = now
            stamped.append(replace(record, elapsed=elapsed))
        return stamped


class SessionTrace:
    """A back-end session's messages logged one line each (`vdev run --trace`).

    On the back-end channel (``channel``) the back-end sends requests and receives
    replies; the calls are the same.
    """

    def __init__(
        self,
        name: str,
        feature_types: Sequence[type[IntFlag]] = (),
        channel: Channel = Channel.MAIN,
    ) -> None:
        self.name = name
        self._trace = Trace(feature_types, channel)

    def received(self, data: bytes, fds: Sequence[int], now: float) -> None:
        """Log what the front-end sent."""
        self._log(self._trace.feed(Direction.FRONTEND, data, fds, now))

    def sent(self, data: bytes, now: float, fds: Sequence[int] = ()) -> None:
        """Log what the back-end sent."""
        self._log(self._trace.feed(Direction.BACKEND, data, fds, now))

    def _log(self, records: Iterable[Record]) -> None:
        for record in records:
            logger.info("%s: %s", self.name, record.text())
