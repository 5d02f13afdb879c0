"""BackendConnection: every handled request end to end, validation, acks and state."""

from __future__ import annotations

import struct

import pytest
from protocol_helpers import FEATURES, NUM_QUEUES, FdLedger, Session

from vdev.protocol import (
    F_PROTOCOL_FEATURES,
    FAILURE_ACK,
    SUPPORTED_PROTOCOL_FEATURES,
    VIRTIO_F_RING_PACKED,
    BackendConnection,
    DeviceConfig,
    HeaderFlag,
    LocalProtocolError,
    LogDescription,
    MemoryRegion,
    MemoryRegionUpdate,
    MemoryTable,
    Message,
    ProtocolFeature,
    RemoteProtocolError,
    Request,
    VringAddress,
    VringFile,
    VringState,
)
from vdev.protocol.framing import encode_message

REGION = MemoryRegion(
    guest_phys_addr=0, memory_size=1 << 30, userspace_addr=0x7F00_0000_0000, mmap_offset=0
)
REGION2 = MemoryRegion(1 << 32, 1 << 30, 0x7F80_0000_0000, 1 << 30)
MAC = bytes.fromhex("525400123456")

# (request, payload, fd count, result passed to complete(), own reply payload or None)
EVENTS: list[tuple[Request, object, int, object, object]] = [
    (Request.SET_FEATURES, FEATURES, 0, None, None),
    (Request.RESET_OWNER, None, 0, None, None),
    (Request.SET_MEM_TABLE, MemoryTable((REGION, REGION2)), 2, None, None),
    (Request.SET_VRING_NUM, VringState(1, 256), 0, None, None),
    (Request.SET_VRING_ADDR, VringAddress(1, 1, 0x1000, 0x2000, 0x3000, 0x4000), 0, None, None),
    (Request.SET_VRING_BASE, VringState(0, 7), 0, None, None),
    (Request.GET_VRING_BASE, VringState(1, 0), 0, VringState(1, 42), VringState(1, 42)),
    (Request.SET_VRING_KICK, VringFile(0, True), 1, None, None),
    (Request.SET_VRING_KICK, VringFile(1, False), 0, None, None),
    (Request.SET_VRING_CALL, VringFile(1, True), 1, None, None),
    (Request.SET_VRING_ERR, VringFile(0, True), 1, None, None),
    (Request.SET_VRING_ENABLE, VringState(1, 1), 0, None, None),
    (Request.SEND_RARP, MAC, 0, None, None),
    (Request.NET_SET_MTU, 1500, 0, None, None),
    (
        Request.GET_CONFIG,
        DeviceConfig(0, 8, 0, bytes(8)),
        0,
        b"12345678",
        DeviceConfig(0, 8, 0, b"12345678"),
    ),
    (Request.SET_CONFIG, DeviceConfig(4, 2, 1, b"xy"), 0, None, None),
    (Request.RESET_DEVICE, None, 0, None, None),
    (Request.ADD_MEM_REG, MemoryRegionUpdate(REGION), 1, None, None),
    (Request.REM_MEM_REG, MemoryRegionUpdate(REGION), 0, None, None),
    (Request.SET_BACKEND_REQ_FD, None, 1, None, None),
    (Request.SET_STATUS, 0x0F, 0, None, None),
    (Request.GET_STATUS, None, 0, 0x0F, 0x0F),
]


def inject(
    session: Session, request: int, body: bytes, fds: list[int], flags: int
) -> Message | None:
    """Feed the back-end a message the front-end helper would refuse to build."""
    session.backend.receive_data(encode_message(request, flags, body), fds)
    return session.backend.next_event()


@pytest.mark.parametrize("need_reply", [False, True])
@pytest.mark.parametrize(
    ("request_", "payload", "nfds", "result", "reply"),
    EVENTS,
    ids=lambda v: getattr(v, "name", None),
)
def test_event_round_trip(
    session: Session,
    ledger: FdLedger,
    request_: Request,
    payload: object,
    nfds: int,
    result: object,
    reply: object,
    need_reply: bool,
) -> None:
    fds = ledger.new(nfds)
    event = session.send(request_, payload, fds, need_reply)
    assert event is not None
    assert (event.request, event.payload, event.need_reply) == (request_, payload, need_reply)
    assert event.fds == tuple(fds)
    session.backend.complete(event, result)
    replies = session.replies()
    if reply is not None:
        assert [(r.request, r.payload) for r in replies] == [(request_, reply)]
    elif need_reply:
        assert [(r.request, r.payload) for r in replies] == [(request_, 0)]
    else:
        assert replies == []
    assert all(r.flags == HeaderFlag.VERSION | HeaderFlag.REPLY for r in replies)
    assert ledger.closed == []
    assert session.backend.next_event() is None


def test_rem_mem_reg_fd_is_tolerated_and_closed(session: Session, ledger: FdLedger) -> None:
    [fd] = ledger.new()
    event = session.send(Request.REM_MEM_REG, MemoryRegionUpdate(REGION), [fd])
    assert event is not None and event.fds == ()
    assert ledger.closed == [fd]


def test_internal_answers(session: Session) -> None:
    for request in (Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS, Request.GET_FEATURES):
        assert session.send(request, need_reply=True) is None
    assert [(r.request, r.payload) for r in session.replies()] == [
        (Request.GET_QUEUE_NUM, NUM_QUEUES),
        (Request.GET_MAX_MEM_SLOTS, 509),
        (Request.GET_FEATURES, FEATURES),  # its own reply only, no extra ack
    ]


def test_negotiation_state(ledger: FdLedger) -> None:
    s = Session(ledger, max_mem_slots=32)
    assert not s.backend.owner and not s.backend.reply_ack
    s.negotiate(int(ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS))
    assert s.backend.owner and s.backend.reply_ack
    assert (
        s.backend.acked_protocol_features
        == ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS
    )
    assert s.send(Request.GET_MAX_MEM_SLOTS) is None
    assert [r.payload for r in s.replies()] == [32]


def test_set_protocol_features_ack_uses_the_new_state(ledger: FdLedger) -> None:
    s = Session(ledger)
    assert (
        s.send(Request.SET_PROTOCOL_FEATURES, int(ProtocolFeature.REPLY_ACK), need_reply=True)
        is None
    )
    assert [(r.request, r.payload) for r in s.replies()] == [(Request.SET_PROTOCOL_FEATURES, 0)]


def test_features_apply_on_complete_only(session: Session) -> None:
    assert session.backend.vring_enabled_at_start
    event = session.send(Request.SET_FEATURES, FEATURES, need_reply=True)
    assert event is not None
    assert session.backend.acked_features == 0
    assert session.backend.fail(event, "device refuses")
    assert session.backend.acked_features == 0
    assert [r.payload for r in session.replies()] == [FAILURE_ACK]
    event = session.send(Request.SET_FEATURES, FEATURES)
    assert event is not None
    session.backend.complete(event)
    assert session.backend.acked_features == FEATURES
    assert not session.backend.vring_enabled_at_start


@pytest.mark.parametrize("reset", [Request.RESET_OWNER, Request.RESET_DEVICE])
def test_reset_clears_features_but_keeps_protocol_features(
    session: Session, reset: Request
) -> None:
    event = session.send(Request.SET_FEATURES, FEATURES & ~F_PROTOCOL_FEATURES)
    assert event is not None
    session.backend.complete(event)
    assert session.backend.acked_features == FEATURES & ~F_PROTOCOL_FEATURES
    event = session.send(reset)
    assert event is not None
    session.backend.complete(event)
    assert session.backend.acked_features == 0
    assert session.backend.acked_protocol_features == SUPPORTED_PROTOCOL_FEATURES
    assert session.backend.reply_ack and session.backend.owner
    assert session.send(Request.SET_VRING_NUM, VringState(0, 64)) is not None


def test_packed_ring_allows_any_size_and_wide_base(session: Session) -> None:
    event = session.send(Request.SET_FEATURES, FEATURES | VIRTIO_F_RING_PACKED)
    assert event is not None
    session.backend.complete(event)
    for request, payload in (
        (Request.SET_VRING_NUM, VringState(0, 100)),
        (Request.SET_VRING_BASE, VringState(0, 0x8000_8000)),
    ):
        event = session.send(request, payload)
        assert event is not None and event.payload == payload
        session.backend.complete(event)


# (request, payload bytes, fd count, error text)
def u64(value: int) -> bytes:
    return struct.pack("=Q", value)


def state(index: int, num: int) -> bytes:
    return VringState(index, num).encode()


def table(*regions: MemoryRegion) -> bytes:
    return MemoryTable(regions).encode()


def config(offset: int, size: int, flags: int = 0) -> bytes:
    return DeviceConfig(offset, size, flags, bytes(size)).encode()


INVALID: list[tuple[int, bytes, int, str]] = [
    (
        Request.SET_FEATURES,
        u64(FEATURES | 1 << 40),
        0,
        "feature bits 0x10000000000 were never offered",
    ),
    (
        Request.SET_PROTOCOL_FEATURES,
        u64(ProtocolFeature.CROSS_ENDIAN),
        0,
        "protocol feature bits 0x40",
    ),
    (Request.SET_MEM_TABLE, table(), 0, "memory table without regions"),
    (Request.SET_MEM_TABLE, table(REGION, REGION2), 1, "1 fds, expected one fd per region"),
    (Request.SET_MEM_TABLE, table(REGION), 2, "2 fds, expected one fd per region"),
    (Request.SET_MEM_TABLE, table(MemoryRegion(0, 0, 0, 0)), 1, "memory region of size 0"),
    (Request.SET_MEM_TABLE, table(MemoryRegion(2**64 - 4096, 8192, 0, 0)), 1, "guest address"),
    (Request.SET_MEM_TABLE, b"\0" * 12, 0, "wrong for 0 regions"),
    (Request.SET_VRING_NUM, state(NUM_QUEUES, 256), 0, "ring index 2 out of range (2 queues)"),
    (Request.SET_VRING_NUM, state(0, 3), 0, "ring size 3 is not a power of two"),
    (Request.SET_VRING_NUM, state(0, 0), 0, "ring size 0 is not in 1..1024"),
    (Request.SET_VRING_NUM, state(0, 2048), 0, "ring size 2048 is not in 1..1024"),
    (Request.SET_VRING_NUM, state(0, 256)[:4], 0, "payload is 4 bytes, expected 8"),
    (Request.SET_VRING_ADDR, VringAddress(0, 2, 0, 0, 0, 0).encode(), 0, "address flags 0x2"),
    (Request.SET_VRING_ADDR, VringAddress(7, 0, 0, 0, 0, 0).encode(), 0, "ring index 7"),
    (Request.SET_VRING_BASE, state(0, 0x10000), 0, "does not fit in 16 bits"),
    (Request.GET_VRING_BASE, state(9, 0), 0, "ring index 9"),
    (Request.SET_VRING_KICK, u64(0), 0, "0 fds, expected one fd unless bit 8 is set"),
    (Request.SET_VRING_CALL, u64(0x100), 1, "1 fds, expected one fd unless bit 8 is set"),
    (Request.SET_VRING_ERR, u64(0x103), 0, "ring index 3"),
    (Request.SET_VRING_KICK, u64(1 << 12), 0, "reserved bits set"),
    (Request.SET_VRING_ENABLE, state(0, 2), 0, "enable value 2 is neither 0 nor 1"),
    (Request.GET_CONFIG, config(0, 300), 0, "config range 0+300"),
    (Request.GET_CONFIG, config(0, 4) + b"x", 0, "size field 4 but 5 data bytes"),
    (Request.SET_CONFIG, config(250, 10), 0, "config range 250+10"),
    (Request.SET_CONFIG, config(0, 0), 0, "config range 0+0 is empty"),
    (Request.SET_CONFIG, config(0, 4, flags=7), 0, "unknown config flags 7"),
    (Request.ADD_MEM_REG, MemoryRegionUpdate(REGION).encode(), 0, "0 fds, expected exactly one fd"),
    (Request.REM_MEM_REG, MemoryRegionUpdate(REGION).encode(), 2, "2 fds, expected at most one"),
    (Request.ADD_MEM_REG, MemoryRegionUpdate(MemoryRegion(0, 0, 0, 0)).encode(), 1, "size 0"),
    (Request.SET_STATUS, u64(0x100), 0, "device status 0x100 does not fit in 8 bits"),
    (Request.GET_STATUS, u64(0), 0, "payload is 8 bytes, expected 0"),
    (Request.GET_FEATURES, u64(0), 0, "payload is 8 bytes, expected 0"),
    (Request.SET_OWNER, b"", 1, "1 fds, expected no fd"),
    (Request.RESET_DEVICE, b"", 1, "1 fds, expected no fd"),
    (Request.NET_SET_MTU, b"\0" * 4, 0, "payload is 4 bytes"),
    (Request.SEND_RARP, MAC, 0, "payload is 6 bytes, expected 8"),
    (Request.SET_LOG_BASE, b"\0" * 16, 1, "dirty log of 0 bytes at offset 0"),
    (Request.SET_LOG_BASE, b"\0" * 8, 1, "payload is 8 bytes, expected 16"),
    (Request.SET_LOG_BASE, LogDescription(4096, 0).encode(), 0, "0 fds, expected exactly one"),
    (Request.SET_LOG_FD, b"", 1, "VHOST_F_LOG_ALL was not offered"),
    (Request.IOTLB_MSG, b"\0" * 32, 0, "request is not supported"),
    (Request.SET_BACKEND_REQ_FD, b"", 0, "0 fds, expected exactly one fd"),
    (Request.SET_BACKEND_REQ_FD, b"", 2, "2 fds, expected exactly one fd"),
    (Request.SET_BACKEND_REQ_FD, u64(0), 1, "payload is 8 bytes, expected 0"),
    (Request.SET_VRING_ENDIAN, state(0, 0), 0, "request is not supported"),
    (Request.VRING_KICK, state(0, 0), 0, "request is not supported"),
    (0, b"", 0, "unknown request 0"),
    (44, b"", 1, "unknown request 44"),
    (1000, b"\0" * 8, 0, "unknown request 1000"),
]
OWN_REPLY = {Request.GET_VRING_BASE, Request.GET_STATUS, Request.GET_FEATURES, Request.IOTLB_MSG}


@pytest.mark.parametrize("need_reply", [False, True])
@pytest.mark.parametrize(("request_", "body", "nfds", "text"), INVALID)
def test_invalid_requests(
    session: Session,
    ledger: FdLedger,
    request_: int,
    body: bytes,
    nfds: int,
    text: str,
    need_reply: bool,
) -> None:
    fds = ledger.new(nfds)
    flags = HeaderFlag.VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
    with pytest.raises(RemoteProtocolError) as info:
        inject(session, request_, body, fds, flags)
    error = info.value
    assert text in str(error)
    known = request_ in Request._value2member_map_
    assert error.request == (Request(request_) if known else None)
    assert str(error).startswith(f"{Request(request_).name}: " if known else "unknown request")
    assert ledger.open == set(), "the bad message's fds must be closed"
    replies = session.backend.data_to_send()
    if request_ == Request.GET_CONFIG:
        expected_fatal = False
        assert replies == encode_message(Request.GET_CONFIG, HeaderFlag.VERSION | HeaderFlag.REPLY)
    elif request_ == Request.SET_LOG_BASE:  # always answered, a failure with non-zero
        expected_fatal = False
        assert replies == encode_message(
            request_, HeaderFlag.VERSION | HeaderFlag.REPLY, u64(FAILURE_ACK)
        )
    else:
        expected_fatal = not need_reply or request_ in OWN_REPLY
        failure = encode_message(request_, HeaderFlag.VERSION | HeaderFlag.REPLY, u64(FAILURE_ACK))
        assert replies == (b"" if expected_fatal else failure)
    assert error.fatal is expected_fatal
    if expected_fatal:
        with pytest.raises(RemoteProtocolError):
            session.send(Request.GET_FEATURES)
    else:
        assert session.send(Request.SET_VRING_ENABLE, VringState(0, 1)) is not None


def test_config_error_reaches_the_frontend_as_none(session: Session) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        session.send(Request.GET_CONFIG, DeviceConfig(0, 257, 0, bytes(257)))
    assert not info.value.fatal
    [reply] = session.replies()
    assert (reply.request, reply.payload) == (Request.GET_CONFIG, None)
    event = session.send(Request.GET_CONFIG, DeviceConfig(0, 4, 0, bytes(4)))
    assert event is not None
    assert session.backend.fail(event, "no config") is True
    [reply] = session.replies()
    assert reply.payload is None


def test_reply_flag_on_a_request_is_rejected(session: Session) -> None:
    flags = HeaderFlag.VERSION | HeaderFlag.REPLY | HeaderFlag.NEED_REPLY
    with pytest.raises(RemoteProtocolError, match="reply flag set on a request") as info:
        inject(session, Request.SET_VRING_ENABLE, state(0, 1), [], flags)
    assert not info.value.fatal


def test_requests_before_set_owner_are_out_of_order(ledger: FdLedger) -> None:
    s = Session(ledger)
    assert s.send(Request.SET_PROTOCOL_FEATURES, int(ProtocolFeature.REPLY_ACK)) is None
    with pytest.raises(
        RemoteProtocolError, match="SET_VRING_NUM: received before SET_OWNER"
    ) as info:
        s.send(Request.SET_VRING_NUM, VringState(0, 256), need_reply=True)
    assert not info.value.fatal
    assert s.send(Request.SET_OWNER) is None
    assert s.send(Request.SET_VRING_NUM, VringState(0, 256)) is not None


def test_backend_req_fd_is_taken_before_set_owner(ledger: FdLedger) -> None:
    # QEMU sets up the back-end channel during negotiation, before SET_OWNER.
    s = Session(ledger)
    features = int(ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ)
    assert s.send(Request.SET_PROTOCOL_FEATURES, features) is None
    [fd] = ledger.new()
    event = s.send(Request.SET_BACKEND_REQ_FD, None, [fd], need_reply=True)
    assert event is not None and event.fds == (fd,)
    s.backend.complete(event)
    assert [(r.request, r.payload) for r in s.replies()] == [(Request.SET_BACKEND_REQ_FD, 0)]


@pytest.mark.parametrize(
    ("offered", "negotiated", "request_", "payload", "text"),
    [
        (SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature.REPLY_ACK, Request.SET_CONFIG,
         DeviceConfig(0, 1, 0, b"x"), "protocol feature CONFIG was not negotiated"),
        (SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature.REPLY_ACK, Request.ADD_MEM_REG, None,
         "protocol feature CONFIGURE_MEM_SLOTS was not negotiated"),
        (SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature.REPLY_ACK, Request.SET_STATUS, 1,
         "protocol feature STATUS was not negotiated"),
        (SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature.REPLY_ACK, Request.SET_BACKEND_REQ_FD,
         None, "protocol feature BACKEND_REQ was not negotiated"),
        (ProtocolFeature.REPLY_ACK, ProtocolFeature.REPLY_ACK, Request.SET_BACKEND_REQ_FD,
         None, "protocol feature BACKEND_REQ is not offered"),
        (ProtocolFeature.REPLY_ACK, ProtocolFeature.REPLY_ACK, Request.SEND_RARP, MAC,
         "protocol feature RARP is not offered"),
        (ProtocolFeature.REPLY_ACK, ProtocolFeature.REPLY_ACK, Request.NET_SET_MTU, 1500,
         "protocol feature NET_MTU is not offered"),
        (ProtocolFeature.REPLY_ACK, ProtocolFeature.REPLY_ACK, Request.RESET_DEVICE, None,
         "protocol feature RESET_DEVICE is not offered"),
        (ProtocolFeature.REPLY_ACK, ProtocolFeature.REPLY_ACK, Request.GET_QUEUE_NUM, None,
         "protocol feature MQ is not offered"),
    ],
)  # fmt: skip
def test_feature_gates(
    ledger: FdLedger,
    offered: int,
    negotiated: int,
    request_: Request,
    payload: object,
    text: str,
) -> None:
    s = Session(ledger, protocol_features=int(offered))
    s.negotiate(int(negotiated))
    fds = []
    if request_ is Request.ADD_MEM_REG:
        payload, fds = MemoryRegionUpdate(REGION), ledger.new()
    elif request_ is Request.SET_BACKEND_REQ_FD:
        fds = ledger.new()
    with pytest.raises(RemoteProtocolError, match=f"{request_.name}: {text}"):
        s.send(request_, payload, fds, need_reply=True)
    assert ledger.open == set()


def test_protocol_feature_requests_need_f_protocol_features(ledger: FdLedger) -> None:
    s = Session(ledger, features=1 << 32, protocol_features=0)
    assert s.send(Request.GET_FEATURES) is None
    assert s.send(Request.SET_OWNER) is None
    with pytest.raises(RemoteProtocolError, match="F_PROTOCOL_FEATURES was not offered") as info:
        s.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    assert info.value.fatal
    s = Session(ledger, features=1 << 32, protocol_features=0)
    with pytest.raises(RemoteProtocolError, match="GET_PROTOCOL_FEATURES: F_PROTOCOL_FEATURES"):
        s.send(Request.GET_PROTOCOL_FEATURES)


def test_without_reply_ack_need_reply_is_ignored_and_failure_disconnects(ledger: FdLedger) -> None:
    s = Session(ledger)
    s.negotiate(int(ProtocolFeature.MQ))
    event = s.send(Request.SET_VRING_NUM, VringState(0, 256), need_reply=True)
    assert event is not None
    s.backend.complete(event)
    assert s.backend.data_to_send() == b""
    event = s.send(Request.SET_VRING_NUM, VringState(0, 256), need_reply=True)
    assert event is not None
    assert s.backend.fail(event, "no") is False
    with pytest.raises(LocalProtocolError, match="connection is unusable"):
        s.backend.next_event()


def test_failure_of_a_request_with_its_own_reply_disconnects(session: Session) -> None:
    event = session.send(Request.GET_VRING_BASE, VringState(0, 0), need_reply=True)
    assert event is not None
    assert session.backend.fail(event, "ring is busy") is False
    assert session.backend.data_to_send() == b""


def test_local_misuse(session: Session) -> None:
    event = session.send(Request.GET_VRING_BASE, VringState(1, 0))
    assert event is not None
    with pytest.raises(LocalProtocolError, match="pending event first"):
        session.backend.next_event()
    other = Message(Request.GET_VRING_BASE, HeaderFlag.VERSION, VringState(1, 0))
    with pytest.raises(LocalProtocolError, match="not the pending event"):
        session.backend.complete(other, VringState(1, 0))
    for bad in (None, 5, VringState(0, 1), VringState(1, 2**32)):
        with pytest.raises(LocalProtocolError, match="GET_VRING_BASE"):
            session.backend.complete(event, bad)
    session.backend.complete(event, VringState(1, 3))
    with pytest.raises(LocalProtocolError, match="not the pending event"):
        session.backend.complete(event, VringState(1, 3))

    event = session.send(Request.GET_CONFIG, DeviceConfig(0, 4, 0, bytes(4)))
    assert event is not None
    for bad in (None, b"abc", "abcd", 4):
        with pytest.raises(LocalProtocolError, match="GET_CONFIG"):
            session.backend.complete(event, bad)
    session.backend.complete(event, bytearray(b"abcd"))

    event = session.send(Request.GET_STATUS)
    assert event is not None
    for bad in (None, 256, -1, b"\x01"):
        with pytest.raises(LocalProtocolError, match="GET_STATUS"):
            session.backend.complete(event, bad)
    session.backend.complete(event, 0x0F)

    event = session.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    assert event is not None
    with pytest.raises(LocalProtocolError, match="has no reply, result must be None"):
        session.backend.complete(event, 0)
    session.backend.complete(event)
    payloads = [r.payload for r in session.replies()]
    assert payloads == [VringState(1, 3), DeviceConfig(0, 4, 0, b"abcd"), 0x0F]


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"protocol_features": int(ProtocolFeature.CROSS_ENDIAN)}, "not implemented"),
        ({"features": 1 << 32}, "without F_PROTOCOL_FEATURES"),
        (
            {
                "features": FEATURES | 1 << 26,
                "protocol_features": int(SUPPORTED_PROTOCOL_FEATURES & ~ProtocolFeature.LOG_SHMFD),
            },
            "VHOST_F_LOG_ALL offered without LOG_SHMFD",
        ),
        ({"features": FEATURES | 1 << 33}, "VIRTIO_F_ACCESS_PLATFORM"),
        ({"num_queues": 0}, "num_queues 0"),
        ({"num_queues": 257}, "num_queues 257"),
        ({"max_queue_size": 0}, "max_queue_size 0"),
        ({"max_queue_size": 65536}, "max_queue_size 65536"),
        ({"max_mem_slots": 0}, "max_mem_slots 0"),
    ],
)
def test_constructor_rejects_what_it_cannot_serve(options: dict[str, int], text: str) -> None:
    arguments = {
        "features": FEATURES,
        "protocol_features": int(SUPPORTED_PROTOCOL_FEATURES),
        "num_queues": 2,
    }
    arguments.update(options)
    with pytest.raises(LocalProtocolError, match=text):
        BackendConnection(**arguments)
