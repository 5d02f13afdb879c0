"""The tracer's decoder (vdev.protocol.describe): bytes and fds in, records out, no sockets."""

from __future__ import annotations

import json
import logging
import struct
import uuid
from enum import IntFlag

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdev.protocol import (
    F_PROTOCOL_FEATURES,
    BackendRequest,
    DeviceConfig,
    FrontendConnection,
    HeaderFlag,
    InflightDescription,
    LogDescription,
    MemoryRegion,
    MemoryRegionUpdate,
    MemoryTable,
    ProtocolFeature,
    Request,
    VringAddress,
    VringFile,
    VringState,
)
from vdev.protocol.describe import (
    MAX_RAW,
    Channel,
    Describer,
    Direction,
    FlagSet,
    Record,
    SessionTrace,
    Trace,
    known_request_names,
)
from vdev.protocol.framing import HEADER, MAX_PAYLOAD_SIZE, encode_message
from vdev.protocol.messages import U64
from vdev.protocol.rules import RULES
from vdev.virtio.features import VirtioFeature

V = HeaderFlag.VERSION
REPLY = V | HeaderFlag.REPLY
VERSION_1 = 1 << 32
REGION = MemoryRegion(0x1000_0000, 0x20_0000, 0x7F00_1000_0000, 0x4000)
REGION_FIELDS = {
    "guest_addr": "0x10000000",
    "size": "0x200000",
    "user_addr": "0x7f0010000000",
    "mmap_offset": "0x4000",
}


class _Blk(IntFlag):
    """A device's feature type, as `vdev trace --device` passes one."""

    FLUSH = 1 << 9


def one(describer: Describer, data: bytes, fds: tuple[int, ...] = ()) -> Record:
    [record] = describer.feed(data, fds)
    return record


def request(req: Request, payload: object = None, *, need_reply: bool = False) -> bytes:
    return FrontendConnection().send(req, payload, _fds_for(req, payload), need_reply=need_reply)


def _fds_for(req: Request, payload: object) -> tuple[int, ...]:
    match payload:
        case MemoryTable(regions=regions):
            return tuple(range(10, 10 + len(regions)))
        case VringFile(fd_present=True) | MemoryRegionUpdate() if req is not Request.REM_MEM_REG:
            return (10,)
    if req in (
        Request.SET_BACKEND_REQ_FD,
        Request.SET_INFLIGHT_FD,
        Request.SET_LOG_BASE,
        Request.SET_LOG_FD,
    ):
        return (10,)
    return ()


def fields(record: Record) -> dict[str, object]:
    """The record's fields as the JSON output has them."""
    assert record.error is None, record.error
    return record.json()["fields"]  # type: ignore[return-value]


INFLIGHT_FIELDS = {"mmap_size": "0x0", "mmap_offset": "0x0", "num_queues": 1, "queue_size": 128}
INFLIGHT_FIELDS2 = {**INFLIGHT_FIELDS, "mmap_size": "0x2000"}
FRONTEND_REQUESTS: list[tuple[Request, object, dict[str, object]]] = [
    (Request.GET_FEATURES, None, {}),
    (
        Request.SET_FEATURES,
        VERSION_1 | F_PROTOCOL_FEATURES | (1 << 9),
        {
            "features": {
                "value": "0x140000200",
                "names": ["FLUSH", "PROTOCOL_FEATURES", "VERSION_1"],
            }
        },
    ),
    (Request.SET_OWNER, None, {}),
    (Request.RESET_OWNER, None, {}),
    (Request.SET_MEM_TABLE, MemoryTable((REGION, REGION)), {"regions": [REGION_FIELDS] * 2}),
    (Request.SET_VRING_NUM, VringState(1, 256), {"index": 1, "size": 256}),
    (
        Request.SET_VRING_ADDR,
        VringAddress(0, 1, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0x99000),
        {
            "index": 0,
            "flags": 1,
            "desc": "0x7f0000001000",
            "used": "0x7f0000003000",
            "avail": "0x7f0000002000",
            "log": "0x99000",
        },
    ),
    (Request.SET_VRING_BASE, VringState(0, 7), {"index": 0, "base": 7}),
    (Request.GET_VRING_BASE, VringState(1, 0), {"index": 1, "base": 0}),
    (Request.SET_VRING_KICK, VringFile(2, True), {"index": 2, "fd": True}),
    (Request.SET_VRING_CALL, VringFile(0, False), {"index": 0, "fd": False}),
    (Request.SET_VRING_ERR, VringFile(3, True), {"index": 3, "fd": True}),
    (Request.GET_PROTOCOL_FEATURES, None, {}),
    (
        Request.SET_PROTOCOL_FEATURES,
        int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK),
        {"protocol_features": {"value": "0x9", "names": ["MQ", "REPLY_ACK"]}},
    ),
    (Request.GET_QUEUE_NUM, None, {}),
    (Request.SET_VRING_ENABLE, VringState(1, 1), {"index": 1, "enable": 1}),
    (Request.SEND_RARP, bytes.fromhex("525400123456"), {"mac": "52:54:00:12:34:56"}),
    (Request.NET_SET_MTU, 9000, {"mtu": 9000}),
    (
        Request.GET_CONFIG,
        DeviceConfig(0, 4, 0, bytes(4)),
        {"offset": 0, "size": 4, "flags": "FRONTEND", "data": "00000000"},
    ),
    (
        Request.SET_CONFIG,
        DeviceConfig(20, 2, 1, b"\x01\x02"),
        {"offset": 20, "size": 2, "flags": "MIGRATION", "data": "0102"},
    ),
    (Request.RESET_DEVICE, None, {}),
    (Request.GET_MAX_MEM_SLOTS, None, {}),
    (Request.ADD_MEM_REG, MemoryRegionUpdate(REGION), REGION_FIELDS),
    (Request.REM_MEM_REG, MemoryRegionUpdate(REGION), REGION_FIELDS),
    (
        Request.SET_STATUS,
        0xF,
        {
            "status": {
                "value": "0xf",
                "names": ["ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK"],
            }
        },
    ),
    (Request.GET_STATUS, None, {}),
    (Request.SET_BACKEND_REQ_FD, None, {}),
    (Request.GET_INFLIGHT_FD, InflightDescription(0, 0, 1, 128), INFLIGHT_FIELDS),
    (Request.SET_INFLIGHT_FD, InflightDescription(8192, 0, 1, 128), INFLIGHT_FIELDS2),
    (
        Request.SET_LOG_BASE,
        LogDescription(0x1000, 0x20),
        {"mmap_size": "0x1000", "mmap_offset": "0x20"},
    ),
    (Request.SET_LOG_FD, None, {}),
]


def test_every_implemented_request_kind_is_listed() -> None:
    assert {req for req, _, _ in FRONTEND_REQUESTS} == set(RULES)


@pytest.mark.parametrize(("req", "payload", "expected"), FRONTEND_REQUESTS)
def test_frontend_requests_are_decoded_field_by_field(
    req: Request, payload: object, expected: dict[str, object]
) -> None:
    describer = Describer(Direction.FRONTEND, feature_types=[VirtioFeature, _Blk])
    fds = _fds_for(req, payload)
    record = one(describer, request(req, payload), fds)
    assert record.name == req.name
    assert record.request == req
    assert record.direction is Direction.FRONTEND
    assert fields(record) == expected
    assert record.fds == fds
    assert record.flag_names == ()
    json.dumps(record.json())


def test_need_reply_and_reply_flags_are_named() -> None:
    describer = Describer(Direction.FRONTEND)
    record = one(describer, request(Request.SET_FEATURES, VERSION_1, need_reply=True))
    assert record.flag_names == ("NEED_REPLY",)
    assert "[NEED_REPLY]" in record.text()
    back = Describer(Direction.BACKEND)
    ack = one(back, encode_message(Request.SET_FEATURES, REPLY, U64.pack(0)))
    assert ack.flag_names == ("REPLY",)
    assert fields(ack) == {"ack": "ok"}


REPLIES: list[tuple[Request, bytes, dict[str, object]]] = [
    (
        Request.GET_FEATURES,
        U64.pack(VERSION_1 | (1 << 40) | 1),
        {"features": {"value": "0x10100000001", "names": ["bit0", "VERSION_1", "RING_RESET"]}},
    ),
    (
        Request.GET_PROTOCOL_FEATURES,
        U64.pack(int(ProtocolFeature.CONFIG | ProtocolFeature.STATUS)),
        {"protocol_features": {"value": "0x10200", "names": ["CONFIG", "STATUS"]}},
    ),
    (Request.GET_QUEUE_NUM, U64.pack(4), {"queues": 4}),
    (Request.GET_MAX_MEM_SLOTS, U64.pack(509), {"slots": 509}),
    (Request.GET_VRING_BASE, VringState(1, 42).encode(), {"index": 1, "base": 42}),
    (
        Request.GET_CONFIG,
        DeviceConfig(0, 3, 0, b"\xab\xcd\xef").encode(),
        {"offset": 0, "size": 3, "flags": "FRONTEND", "data": "abcdef"},
    ),
    (Request.GET_CONFIG, b"", {"failed": True}),
    (
        Request.GET_STATUS,
        U64.pack(0x80),
        {"status": {"value": "0x80", "names": ["FAILED"]}},
    ),
    (Request.SET_MEM_TABLE, U64.pack(1), {"ack": "failed (1)"}),
    (Request.SET_VRING_ADDR, U64.pack(0), {"ack": "ok"}),
    (
        Request.GET_INFLIGHT_FD,
        struct.pack("=QQHH4x", 0x3000, 0, 2, 256),
        {"mmap_size": "0x3000", "mmap_offset": "0x0", "num_queues": 2, "queue_size": 256},
    ),
]


@pytest.mark.parametrize(("req", "body", "expected"), REPLIES)
def test_backend_replies_are_decoded(
    req: Request, body: bytes, expected: dict[str, object]
) -> None:
    describer = Describer(Direction.BACKEND, feature_types=[VirtioFeature])
    record = one(describer, encode_message(req, REPLY, body))
    assert record.name == req.name
    assert fields(record) == expected


def test_requests_the_protocol_layer_does_not_implement_are_named_with_their_fields() -> None:
    describer = Describer(Direction.FRONTEND)
    channel = one(describer, encode_message(Request.SET_BACKEND_REQ_FD, V), (12,))
    assert (channel.name, fields(channel), channel.fds) == ("SET_BACKEND_REQ_FD", {}, (12,))
    endian = one(describer, encode_message(Request.SET_VRING_ENDIAN, V, VringState(0, 1).encode()))
    assert fields(endian) == {"index": 0, "big_endian": 1}
    crypto = one(describer, encode_message(Request.CREATE_CRYPTO_SESSION, V, b"\x01\x02"))
    assert fields(crypto) == {"payload": "0102"}


BACKEND_CHANNEL: list[tuple[BackendRequest, bytes, dict[str, object]]] = [
    (BackendRequest.CONFIG_CHANGE_MSG, b"", {}),
    (BackendRequest.VRING_CALL, VringState(1, 0).encode(), {"index": 1, "num": 0}),
    (BackendRequest.VRING_ERR, VringState(0, 0).encode(), {"index": 0, "num": 0}),
    (
        BackendRequest.VRING_HOST_NOTIFIER_MSG,
        struct.pack("=QQQ", 0x102, 0x1000, 0x2000),
        {"index": 2, "size": "0x1000", "offset": "0x2000", "fd": False},
    ),
    (
        BackendRequest.IOTLB_MSG,
        struct.pack("=QQQBB6x", 0x1000, 0x2000, 0x7F00_0000_0000, 3, 2),
        {"iova": "0x1000", "size": "0x2000", "user_addr": "0x7f0000000000", "perm": 3, "type": 2},
    ),
    (
        BackendRequest.SHARED_OBJECT_ADD,
        uuid.UUID(int=5).bytes,
        {"uuid": "00000000-0000-0000-0000-000000000005"},
    ),
]


@pytest.mark.parametrize(("req", "body", "expected"), BACKEND_CHANNEL)
def test_backend_channel_requests_and_their_acks(
    req: BackendRequest, body: bytes, expected: dict[str, object]
) -> None:
    requests = Describer(Direction.BACKEND, Channel.BACKEND)
    record = one(requests, encode_message(req, V | HeaderFlag.NEED_REPLY, body))
    assert (record.name, record.channel) == (req.name, Channel.BACKEND)
    assert fields(record) == expected
    assert "[back-end channel]" in record.text()
    acks = Describer(Direction.FRONTEND, Channel.BACKEND)
    assert fields(one(acks, encode_message(req, REPLY, U64.pack(0)))) == {"ack": "ok"}


def test_fds_stay_with_the_message_they_came_with() -> None:
    describer = Describer(Direction.FRONTEND)
    describer.feed(request(Request.SET_VRING_CALL, VringFile(0, True))[:5], (20,))
    rest = request(Request.SET_VRING_CALL, VringFile(0, True))[5:]
    kick = request(Request.SET_VRING_KICK, VringFile(0, True))
    records = describer.feed(rest) + describer.feed(kick, (21,))
    assert [(r.name, r.fds) for r in records] == [
        ("SET_VRING_CALL", (20,)),
        ("SET_VRING_KICK", (21,)),
    ]


# --- garbage, both ways -------------------------------------------------------------------


@pytest.mark.parametrize("direction", list(Direction))
def test_a_truncated_header_is_reported_when_the_stream_ends(direction: Direction) -> None:
    describer = Describer(direction)
    assert describer.feed(b"\x01\x00\x00\x00\x01") == []
    [record] = describer.close()
    assert record.error == "stream ended inside a message (5 bytes)"
    assert (record.name, record.raw) == ("GARBAGE", b"\x01\x00\x00\x00\x01")
    assert describer.lost
    assert describer.close() == []


@pytest.mark.parametrize("direction", list(Direction))
def test_an_oversize_payload_loses_the_framing(direction: Direction) -> None:
    describer = Describer(direction)
    flags = V if direction is Direction.FRONTEND else REPLY
    garbage = HEADER.pack(Request.GET_FEATURES, flags, MAX_PAYLOAD_SIZE + 1) + b"\xee" * 1000
    [record] = describer.feed(garbage, (30,))
    assert record.name == "GET_FEATURES"
    assert record.error == f"framing lost: payload size {MAX_PAYLOAD_SIZE + 1} exceeds 4096"
    assert record.raw == garbage[:MAX_RAW]
    assert record.fds == (30,)
    assert f"raw={garbage[:MAX_RAW].hex()}" in record.text()
    assert describer.lost
    assert describer.feed(request(Request.GET_FEATURES)) == []


@pytest.mark.parametrize(
    ("direction", "message", "error"),
    [
        (Direction.FRONTEND, encode_message(99, V, b"\x01"), "unknown request on the main channel"),
        (Direction.BACKEND, encode_message(77, REPLY), "unknown request on the main channel"),
        (
            Direction.FRONTEND,
            encode_message(Request.SET_FEATURES, 0x2, U64.pack(1)),
            "bad protocol version 2 in flags 0x2",
        ),
        (
            Direction.FRONTEND,
            encode_message(Request.SET_VRING_NUM, V, b"\x01\x02\x03"),
            "payload is 3 bytes, expected 8",
        ),
        (
            Direction.BACKEND,
            encode_message(Request.GET_FEATURES, REPLY, b"\x01\x02"),
            "payload is 2 bytes, expected 8",
        ),
        (
            Direction.BACKEND,
            encode_message(Request.SET_OWNER, REPLY, b"\x00" * 4),
            "payload is 4 bytes, expected 8",
        ),
        (
            Direction.FRONTEND,
            encode_message(Request.GET_FEATURES, REPLY, U64.pack(0)),
            "a reply from the front-end on the main channel",
        ),
        (
            Direction.BACKEND,
            encode_message(Request.GET_FEATURES, V),
            "a request from the back-end on the main channel",
        ),
    ],
)
def test_malformed_messages_are_error_records_and_decoding_goes_on(
    direction: Direction, message: bytes, error: str
) -> None:
    describer = Describer(direction)
    following = (
        request(Request.GET_FEATURES)
        if direction is Direction.FRONTEND
        else encode_message(Request.GET_FEATURES, REPLY, U64.pack(VERSION_1))
    )
    bad, good = describer.feed(message + following)
    assert bad.error == error
    assert bad.raw == message
    assert bad.json()["raw"] == message.hex()
    assert good.error is None and good.name == "GET_FEATURES"
    assert not describer.lost


def test_unknown_request_names_its_number() -> None:
    record = one(Describer(Direction.FRONTEND), encode_message(99, V))
    assert record.name == "UNKNOWN(99)"
    assert record.json()["code"] == 99


def test_reserved_header_bits_are_shown() -> None:
    record = one(Describer(Direction.FRONTEND), encode_message(Request.SET_OWNER, V | 0x100))
    assert record.flag_names == ("0x100",)


# --- a connection's trace ------------------------------------------------------------------


def test_trace_stamps_the_time_since_the_previous_message_either_way() -> None:
    trace = Trace([VirtioFeature])
    [first] = trace.feed(Direction.FRONTEND, request(Request.GET_FEATURES), (), now=10.0)
    reply = encode_message(Request.GET_FEATURES, REPLY, U64.pack(VERSION_1))
    [second] = trace.feed(Direction.BACKEND, reply, (), now=10.25)
    [third] = trace.feed(Direction.FRONTEND, request(Request.SET_OWNER), (), now=11.0)
    assert [r.elapsed for r in (first, second, third)] == [None, 0.25, 0.75]
    assert second.text() == "+0.250000s back-end -> front-end GET_FEATURES [REPLY] " + (
        "features=0x100000000<VERSION_1>"
    )
    assert trace.feed(Direction.BACKEND, b"\x01", (), now=12.0) == []
    [cut] = trace.close(Direction.BACKEND, now=12.5)
    assert cut.error is not None and cut.elapsed == 1.5
    assert trace.lost(Direction.BACKEND) and not trace.lost(Direction.FRONTEND)


def test_session_trace_logs_one_line_per_message(caplog: pytest.LogCaptureFixture) -> None:
    trace = SessionTrace("disk.sock", [VirtioFeature])
    with caplog.at_level(logging.INFO, logger="vdev.protocol.describe"):
        two = request(Request.SET_OWNER) + request(Request.GET_FEATURES)
        trace.received(two, (), now=1.0)
        trace.sent(encode_message(Request.GET_FEATURES, REPLY, U64.pack(VERSION_1)), now=1.5)
    assert [r.getMessage() for r in caplog.records] == [
        "disk.sock: +? front-end -> back-end SET_OWNER",
        "disk.sock: +0.000000s front-end -> back-end GET_FEATURES",
        "disk.sock: +0.500000s back-end -> front-end GET_FEATURES [REPLY] "
        "features=0x100000000<VERSION_1>",
    ]


def test_session_trace_of_the_back_end_channel(caplog: pytest.LogCaptureFixture) -> None:
    trace = SessionTrace("nic.sock", channel=Channel.BACKEND)
    with caplog.at_level(logging.INFO, logger="vdev.protocol.describe"):
        trace.sent(encode_message(BackendRequest.VRING_CALL, V, VringState(1, 0).encode()), 2.0)
        trace.received(encode_message(BackendRequest.VRING_CALL, REPLY, U64.pack(0)), (), 2.5)
    assert [r.getMessage() for r in caplog.records] == [
        "nic.sock: +? back-end -> front-end [back-end channel] VRING_CALL index=1 num=0",
        "nic.sock: +0.500000s front-end -> back-end [back-end channel] VRING_CALL [REPLY] ack=ok",
    ]


def test_flag_sets_name_each_bit_by_the_first_type_that_knows_it() -> None:
    flags = FlagSet.of(VERSION_1 | (1 << 9) | (1 << 3), [VirtioFeature, _Blk])
    assert flags.names == ("bit3", "FLUSH", "VERSION_1")
    assert FlagSet.of(0, [VirtioFeature]).names == ()


def test_known_request_names_cover_both_channels() -> None:
    names = known_request_names()
    assert {"SET_MEM_TABLE", "GET_FEATURES", "CONFIG_CHANGE_MSG", "VRING_CALL"} <= names
    assert "FOO" not in names


def _header_then_bytes() -> st.SearchStrategy[bytes]:
    """A plausible header (any request, flags and a small size) and random bytes."""
    header = st.builds(HEADER.pack, st.integers(0, 60), st.integers(0, 15), st.integers(0, 300))
    return st.tuples(header, st.binary(max_size=400)).map(b"".join)


@given(
    chunks=st.lists(st.one_of(st.binary(max_size=64), _header_then_bytes()), max_size=8),
    direction=st.sampled_from(list(Direction)),
    channel=st.sampled_from(list(Channel)),
)
def test_garbage_never_raises(chunks: list[bytes], direction: Direction, channel: Channel) -> None:
    describer = Describer(direction, channel, [VirtioFeature])
    records = [r for chunk in chunks for r in describer.feed(chunk)] + describer.close()
    for record in records:
        json.dumps(record.json())
        record.text()
        assert record.error is None or record.raw
