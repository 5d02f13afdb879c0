"""Sans-I/O vhost-user sessions: bytes and fds in, events out; results in, bytes out.

``BackendConnection`` is what a vhost-user server drives; ``FrontendConnection`` is the
other side, for a Python front-end used in tests. Neither does any I/O.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import cast

from .constants import (
    F_PROTOCOL_FEATURES,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_QUEUES,
    MAX_VIRTQUEUE_SIZE,
    VHOST_F_LOG_ALL,
    VHOST_VRING_F_LOG,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_PACKED,
    ConfigType,
    HeaderFlag,
    ProtocolFeature,
    Request,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .framing import FrameReader, RawMessage, encode_message, request_name
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
    encode_payload,
)
from .rules import (
    RULES,
    SUPPORTED_PROTOCOL_FEATURES,
    FdRule,
    Rule,
    fd_count_range,
    has_own_reply,
)

logger = logging.getLogger(__name__)

FAILURE_ACK = 1
"""The u64 a back-end replies with when a request failed (0 means success)."""
_REPLY_FLAGS = HeaderFlag.VERSION | HeaderFlag.REPLY
_U64_LIMIT = 1 << 64
_STATUS_LIMIT = 1 << 8
_SPLIT_BASE_LIMIT = 1 << 16
_CONFIG_TYPES = frozenset(ConfigType)
#: Names of the virtio feature bits that gate requests (`Rule.virtio_feature`).
_GATE_FEATURES = {F_PROTOCOL_FEATURES: "F_PROTOCOL_FEATURES", VHOST_F_LOG_ALL: "VHOST_F_LOG_ALL"}


@dataclass(frozen=True)
class Message:
    """A decoded request (back-end side) or reply (front-end side).

    ``payload`` is None, an int (u64), 6 bytes (SEND_RARP's MAC) or one of the payload
    dataclasses; ``fds`` belong to whoever received the Message.
    """

    request: Request
    flags: int
    payload: object
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        """Whether the sender asked for a REPLY_ACK acknowledgement."""
        return bool(self.flags & HeaderFlag.NEED_REPLY)


def _check_region(region: MemoryRegion) -> None:
    if region.memory_size == 0:
        raise ValueError("memory region of size 0")
    for name, start in (
        ("guest address", region.guest_phys_addr),
        ("user address", region.userspace_addr),
        ("mmap offset", region.mmap_offset),
    ):
        if start + region.memory_size > _U64_LIMIT:
            raise ValueError(f"memory region {name} 0x{start:x} + size overflows 64 bits")


def _check_ring_alignment(address: VringAddress, packed: bool) -> None:
    """Refuse ring areas the spec does not allow (virtio 1.2 sections 2.7 and 2.8).

    Split: descriptors 16, driver area (avail) 2, device area (used) 4 bytes; packed:
    descriptors 16, both event areas 4. The user addresses are checked: they map to
    guest addresses by a region's offset, which keeps page alignment.
    """
    areas = (
        ("descriptor table", address.desc_user_addr, 16),
        ("driver area", address.avail_user_addr, 4 if packed else 2),
        ("device area", address.used_user_addr, 4),
    )
    for name, addr, align in areas:
        if addr % align:
            raise ValueError(f"{name} address 0x{addr:x} is not {align}-byte aligned")


class BackendConnection:
    """The back-end (device) side of one vhost-user session.

    Feed it with ``receive_data``; ``next_event`` answers the pure-protocol requests
    itself and returns every other valid request as a Message, which the caller must
    ``complete`` or ``fail`` before asking for the next one; ``data_to_send`` yields
    the replies queued so far.
    """

    def __init__(
        self,
        *,
        features: int,
        protocol_features: int,
        num_queues: int,
        max_queue_size: int = 1024,
        max_mem_slots: int = 509,
        close_fd: Callable[[int], None] = os.close,
    ) -> None:
        unsupported = protocol_features & ~SUPPORTED_PROTOCOL_FEATURES
        if unsupported:
            raise LocalProtocolError(
                f"protocol features {ProtocolFeature(unsupported)!r} are not implemented"
            )
        if protocol_features and not features & F_PROTOCOL_FEATURES:
            raise LocalProtocolError("protocol features offered without F_PROTOCOL_FEATURES")
        if features & VIRTIO_F_ACCESS_PLATFORM:
            raise LocalProtocolError("VIRTIO_F_ACCESS_PLATFORM is not implemented")
        if features & VHOST_F_LOG_ALL and not protocol_features & ProtocolFeature.LOG_SHMFD:
            raise LocalProtocolError("VHOST_F_LOG_ALL offered without LOG_SHMFD (the shared log)")
        if not 1 <= num_queues <= MAX_QUEUES:
            raise LocalProtocolError(f"num_queues {num_queues} is not in 1..{MAX_QUEUES}")
        if not 1 <= max_queue_size <= MAX_VIRTQUEUE_SIZE:
            raise LocalProtocolError(
                f"max_queue_size {max_queue_size} is not in 1..{MAX_VIRTQUEUE_SIZE}"
            )
        if max_mem_slots < 1:
            raise LocalProtocolError(f"max_mem_slots {max_mem_slots} is below 1")
        self.features = features
        self.protocol_features = protocol_features
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.max_mem_slots = max_mem_slots
        self._close_fd = close_fd
        self._reader = FrameReader()
        self._outbox = bytearray()
        self._outbox_fds: list[int] = []
        self._pending: Message | None = None
        self._dead: ProtocolError | None = None
        self._acked_features = 0
        self._acked_protocol_features = 0
        self._owner = False

    @property
    def acked_features(self) -> int:
        """Virtio features set by the last successful SET_FEATURES (0 after a reset)."""
        return self._acked_features

    @property
    def acked_protocol_features(self) -> int:
        """Protocol features set by SET_PROTOCOL_FEATURES (kept across resets)."""
        return self._acked_protocol_features

    @property
    def reply_ack(self) -> bool:
        """Whether REPLY_ACK was negotiated."""
        return bool(self._acked_protocol_features & ProtocolFeature.REPLY_ACK)

    @property
    def owner(self) -> bool:
        """Whether SET_OWNER was received."""
        return self._owner

    @property
    def vring_enabled_at_start(self) -> bool:
        """Rings start enabled unless F_PROTOCOL_FEATURES was acked (spec: Ring states)."""
        return not self._acked_features & F_PROTOCOL_FEATURES

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add bytes read from the socket and the fds received with them."""
        if self._dead is not None:
            self._close_all(fds)
            return
        self._reader.feed(data, fds)

    def next_event(self) -> Message | None:
        """The next request for the caller, or None when more data is needed.

        Raises RemoteProtocolError for an invalid message (its fds already closed; see
        ``.fatal``) and LocalProtocolError if the previous event is still pending.
        """
        self._check_alive()
        if self._pending is not None:
            raise LocalProtocolError(
                "complete() or fail() the pending event first", request=self._pending.request
            )
        while True:
            try:
                raw = self._reader.next_message()
            except RemoteProtocolError as exc:
                self._die(exc)
                raise
            if raw is None:
                return None
            msg = self._accept(raw)
            if RULES[msg.request].internal:
                self._finish(msg, self._internal_result(msg))
                continue
            logger.debug("event %s", msg)
            self._pending = msg
            return msg

    def complete(self, msg: Message, result: object = None, fds: Sequence[int] = ()) -> None:
        """Report that the handler of ``msg`` succeeded and queue its reply.

        ``result`` is a VringState for GET_VRING_BASE, the config bytes for GET_CONFIG,
        the status int for GET_STATUS, an InflightDescription (and its fd in ``fds``)
        for GET_INFLIGHT_FD and None for everything else. The fds go out with the
        reply (``fds_to_send``); the caller still owns them.
        """
        self._check_pending(msg)
        if len(fds) != RULES[msg.request].reply_fd:
            raise LocalProtocolError(f"{len(fds)} fds for this reply", request=msg.request)
        self._finish(msg, result)
        self._outbox_fds += fds
        self._pending = None

    def fail(self, msg: Message, reason: str) -> bool:
        """Report that the handler of ``msg`` failed.

        Returns True when the front-end was told (a failure reply is queued) and the
        session goes on, False when the caller must disconnect.
        """
        self._check_pending(msg)
        self._pending = None
        logger.debug("%s failed: %s", msg.request.name, reason)
        if self._send_failure(msg.request, msg.flags):
            return True
        self._die(
            LocalProtocolError(
                f"handler failed and the front-end cannot be told: {reason}", request=msg.request
            )
        )
        return False

    def data_to_send(self) -> bytes:
        """Everything queued for the front-end since the last call."""
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    def fds_to_send(self) -> list[int]:
        """The fds to send with that data (as SCM_RIGHTS, with its first byte)."""
        fds, self._outbox_fds = self._outbox_fds, []
        return fds

    def close(self) -> None:
        """Close the fds received but not handed out; the connection is then unusable."""
        if self._dead is None:
            self._dead = LocalProtocolError("connection is closed")
        self._close_all(self._reader.take_fds())

    # -- internals ---------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise type(self._dead)(
                f"connection is unusable: {self._dead}", request=self._dead.request
            )

    def _check_pending(self, msg: Message) -> None:
        self._check_alive()
        if msg is not self._pending:
            raise LocalProtocolError("not the pending event", request=msg.request)

    def _die(self, error: ProtocolError) -> None:
        self._dead = error
        self._close_all(self._reader.take_fds())

    def _close_all(self, fds: Iterable[int]) -> None:
        for fd in fds:
            self._close_fd(fd)

    def _accept(self, raw: RawMessage) -> Message:
        """Validate ``raw``; on error close its fds, maybe queue a failure reply, raise."""
        request = request_name(raw.request)
        if len(raw.fds) > MAX_FDS:
            raise self._reject(raw, request, f"{len(raw.fds)} fds, at most {MAX_FDS}", fatal=True)
        try:
            msg = self._validate(raw, request)
        except ValueError as exc:
            raise self._reject(raw, request, str(exc)) from None
        if RULES[msg.request].fds is FdRule.DISCARDED:
            self._close_all(raw.fds)
        return msg

    def _reject(
        self, raw: RawMessage, request: Request | None, reason: str, *, fatal: bool = False
    ) -> RemoteProtocolError:
        self._close_all(raw.fds)
        fatal = fatal or not self._send_failure(request, raw.flags, raw.request)
        error = RemoteProtocolError(reason, request=request, fatal=fatal)
        logger.debug("rejected: %s (fatal: %s)", error, fatal)
        if fatal:
            self._die(error)
        return error

    def _send_failure(self, request: Request | None, flags: int, number: int = 0) -> bool:
        """Queue the failure reply the spec allows for this request, if any."""
        if request is Request.GET_CONFIG:
            self._send_reply(request, b"")  # spec: an empty GET_CONFIG reply is an error
            return True
        if request is Request.SET_LOG_BASE:  # always answered: a failure is non-zero
            self._send_reply(request, U64.pack(FAILURE_ACK))
            return True
        if self.reply_ack and flags & HeaderFlag.NEED_REPLY and not has_own_reply(request):
            self._send_reply(request if request is not None else number, U64.pack(FAILURE_ACK))
            return True
        return False

    def _send_reply(self, request: int, body: bytes) -> None:
        self._outbox += encode_message(request, _REPLY_FLAGS, body)

    def _validate(self, raw: RawMessage, request: Request | None) -> Message:
        if request is None:
            raise ValueError(f"unknown request {raw.request}")
        rule = RULES.get(request)
        if rule is None:
            raise ValueError("request is not supported")
        if raw.flags & HeaderFlag.REPLY:
            raise ValueError("reply flag set on a request")
        self._check_gate(rule)
        payload = decode_payload(rule.payload, raw.payload)
        least, most = fd_count_range(rule, payload)
        if not least <= len(raw.fds) <= most:
            raise ValueError(f"{len(raw.fds)} fds, expected {rule.fds.value}")
        self._check_payload(request, payload)
        fds = () if rule.fds is FdRule.DISCARDED else raw.fds
        return Message(request, raw.flags, payload, fds)

    def _check_gate(self, rule: Rule) -> None:
        if rule.virtio_feature and not self.features & rule.virtio_feature:
            raise ValueError(f"{_GATE_FEATURES[rule.virtio_feature]} was not offered")
        feature = rule.protocol_feature
        if feature is not None:
            if not self.protocol_features & feature:
                raise ValueError(f"protocol feature {feature.name} is not offered")
            if rule.acked and not self._acked_protocol_features & feature:
                raise ValueError(f"protocol feature {feature.name} was not negotiated")
        if rule.session and not self._owner:
            raise ValueError("received before SET_OWNER")

    def _check_index(self, index: int) -> None:
        if index >= self.num_queues:
            raise ValueError(f"ring index {index} out of range ({self.num_queues} queues)")

    def _check_payload(self, request: Request, payload: object) -> None:
        packed = bool(self._acked_features & VIRTIO_F_RING_PACKED)
        match request, payload:
            case Request.SET_FEATURES, int(features):
                if extra := features & ~self.features:
                    raise ValueError(f"feature bits 0x{extra:x} were never offered")
            case Request.SET_PROTOCOL_FEATURES, int(features):
                if extra := features & ~self.protocol_features:
                    raise ValueError(f"protocol feature bits 0x{extra:x} were never offered")
            case Request.SET_MEM_TABLE, MemoryTable(regions=regions):
                if not regions:
                    raise ValueError("memory table without regions")
                for region in regions:
                    _check_region(region)
            case Request.ADD_MEM_REG | Request.REM_MEM_REG, MemoryRegionUpdate(region=region):
                _check_region(region)
            case Request.SET_VRING_NUM, VringState(index=index, num=num):
                self._check_index(index)
                if not 1 <= num <= self.max_queue_size:
                    raise ValueError(f"ring size {num} is not in 1..{self.max_queue_size}")
                if not packed and num & (num - 1):
                    raise ValueError(f"ring size {num} is not a power of two")
            case Request.SET_VRING_BASE, VringState(index=index, num=num):
                self._check_index(index)
                if not packed and num >= _SPLIT_BASE_LIMIT:
                    raise ValueError(f"split ring base {num} does not fit in 16 bits")
            case Request.SET_VRING_ENABLE, VringState(index=index, num=num):
                self._check_index(index)
                if num not in (0, 1):
                    raise ValueError(f"enable value {num} is neither 0 nor 1")
            case Request.GET_VRING_BASE, VringState(index=index):
                self._check_index(index)
            case Request.SET_VRING_ADDR, VringAddress(index=index, flags=flags) as address:
                self._check_index(index)
                if flags & ~VHOST_VRING_F_LOG:
                    raise ValueError(f"unknown ring address flags 0x{flags:x}")
                _check_ring_alignment(address, packed)
            case _, VringFile(index=index):
                self._check_index(index)
            case _, DeviceConfig(offset=offset, size=size, flags=flags):
                if flags not in _CONFIG_TYPES:
                    raise ValueError(f"unknown config flags {flags}")
                if size == 0 or offset + size > MAX_CONFIG_SIZE:
                    raise ValueError(
                        f"config range {offset}+{size} is empty or beyond {MAX_CONFIG_SIZE} bytes"
                    )
            case Request.GET_INFLIGHT_FD | Request.SET_INFLIGHT_FD, InflightDescription() as d:
                if not 1 <= d.num_queues <= self.num_queues:
                    raise ValueError(f"in-flight buffer for {d.num_queues} queues")
                if not 1 <= d.queue_size <= self.max_queue_size:
                    raise ValueError(f"in-flight buffer for queues of {d.queue_size}")
            case Request.SET_LOG_BASE, LogDescription(mmap_size=size, mmap_offset=offset):
                if size == 0 or offset + size > _U64_LIMIT:
                    raise ValueError(f"dirty log of {size} bytes at offset {offset}")
            case Request.SET_STATUS, int(status):
                if status >= _STATUS_LIMIT:
                    raise ValueError(f"device status 0x{status:x} does not fit in 8 bits")

    def _internal_result(self, msg: Message) -> int | None:
        match msg.request:
            case Request.GET_FEATURES:
                return self.features
            case Request.GET_PROTOCOL_FEATURES:
                return self.protocol_features
            case Request.GET_QUEUE_NUM:
                return self.num_queues
            case Request.GET_MAX_MEM_SLOTS:
                return self.max_mem_slots
        return None

    def _finish(self, msg: Message, result: object) -> None:
        """Queue the reply or ack of a successful request and apply its effects."""
        rule = RULES[msg.request]
        if rule.reply is not None:
            self._send_reply(msg.request, self._reply_body(msg, rule.reply, result))
            return
        if result is not None:
            raise LocalProtocolError(
                f"has no reply, result must be None, not {result!r}", request=msg.request
            )
        self._apply(msg)
        if self.reply_ack and msg.need_reply:
            self._send_reply(msg.request, U64.pack(0))

    def _reply_body(self, msg: Message, kind: PayloadKind, result: object) -> bytes:
        value = result
        match msg.request, msg.payload, result:
            case Request.GET_CONFIG, DeviceConfig() as config, bytes() | bytearray() as data:
                value = replace(config, data=bytes(data))
            case Request.GET_CONFIG, _, _:
                raise LocalProtocolError(
                    f"result must be bytes, not {result!r}", request=msg.request
                )
            case Request.GET_VRING_BASE, VringState(index=index), VringState(index=other):
                if other != index:
                    raise LocalProtocolError(
                        f"result is for ring {other}, not {index}", request=msg.request
                    )
            case Request.GET_STATUS, _, int(status) if not 0 <= status < _STATUS_LIMIT:
                raise LocalProtocolError(
                    f"status {status} does not fit in 8 bits", request=msg.request
                )
        try:
            return encode_payload(kind, value)
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(f"bad result: {exc}", request=msg.request) from exc

    def _apply(self, msg: Message) -> None:
        match msg.request:
            case Request.SET_FEATURES:
                self._acked_features = cast(int, msg.payload)
            case Request.RESET_OWNER | Request.RESET_DEVICE:
                self._acked_features = 0
            case Request.SET_PROTOCOL_FEATURES:
                self._acked_protocol_features = cast(int, msg.payload)
            case Request.SET_OWNER:
                self._owner = True


class FrontendConnection:
    """The front-end (driver) side: encodes requests and decodes the replies they get."""

    def __init__(self, *, close_fd: Callable[[int], None] = os.close) -> None:
        self._close_fd = close_fd
        self._reader = FrameReader()
        self._expected: deque[tuple[Request, PayloadKind]] = deque()
        self._acked_protocol_features = 0

    @property
    def acked_protocol_features(self) -> int:
        """Protocol features sent in the last SET_PROTOCOL_FEATURES."""
        return self._acked_protocol_features

    @property
    def reply_ack(self) -> bool:
        """Whether REPLY_ACK was sent in SET_PROTOCOL_FEATURES."""
        return bool(self._acked_protocol_features & ProtocolFeature.REPLY_ACK)

    @property
    def pending_replies(self) -> int:
        """How many replies the requests sent so far still await."""
        return len(self._expected)

    def send(
        self,
        request: Request,
        payload: object = None,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> bytes:
        """Encode a request; ``fds`` (only counted here) must go with it as SCM_RIGHTS.

        Requests this package does not implement take raw ``bytes`` (or None) payloads.
        """
        rule = RULES.get(request)
        try:
            if rule is not None:
                body = encode_payload(rule.payload, payload)
                least, most = fd_count_range(rule, payload)
                if not least <= len(fds) <= most:
                    raise ValueError(f"{len(fds)} fds, expected {rule.fds.value}")
            elif payload is None or isinstance(payload, bytes):
                body = payload or b""
            else:
                raise TypeError(f"payload must be raw bytes, not {payload!r}")
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(str(exc), request=request) from exc
        if len(fds) > MAX_FDS:
            raise LocalProtocolError(f"{len(fds)} fds, at most {MAX_FDS}", request=request)
        if request is Request.SET_PROTOCOL_FEATURES:
            self._acked_protocol_features = cast(int, payload)
        if rule is not None and rule.reply is not None:
            self._expected.append((request, rule.reply))
        elif need_reply and self.reply_ack and not has_own_reply(request):
            self._expected.append((request, PayloadKind.U64))
        flags = HeaderFlag.VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
        return encode_message(request, flags, body)

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add bytes read from the socket and the fds received with them."""
        self._reader.feed(data, fds)

    def next_reply(self) -> Message | None:
        """The next reply, or None when more data is needed (RemoteProtocolError if bad).

        Payloads: int for u64 replies and acks, VringState for GET_VRING_BASE,
        DeviceConfig for GET_CONFIG (None when the back-end reported an error).
        """
        raw = self._reader.next_message()
        if raw is None:
            return None
        try:
            return self._decode_reply(raw)
        except RemoteProtocolError:
            self._close_all(raw.fds)
            raise

    def _decode_reply(self, raw: RawMessage) -> Message:
        if not self._expected:
            raise RemoteProtocolError("reply to no request", request=request_name(raw.request))
        request, kind = self._expected.popleft()
        if raw.request != request:
            raise RemoteProtocolError(f"got a reply to request {raw.request}", request=request)
        if not raw.flags & HeaderFlag.REPLY:
            raise RemoteProtocolError("reply flag missing", request=request)
        if kind is PayloadKind.DEVICE_CONFIG and not raw.payload:
            return Message(request, raw.flags, None)
        rule = RULES.get(request)
        fds = 1 if rule is not None and rule.reply_fd and kind is rule.reply else 0
        if len(raw.fds) != fds:
            raise RemoteProtocolError(
                f"reply carries {len(raw.fds)} fds, not {fds}", request=request
            )
        try:
            payload = decode_payload(kind, raw.payload)
        except ValueError as exc:
            raise RemoteProtocolError(str(exc), request=request) from None
        return Message(request, raw.flags, payload, tuple(raw.fds))

    def close(self) -> None:
        """Close fds received but not attached to a reply."""
        self._close_all(self._reader.take_fds())

    def _close_all(self, fds: Iterable[int]) -> None:
        for fd in fds:
            self._close_fd(fd)
