"""FrontendConnection: request encoding, reply expectations and bad replies."""

from __future__ import annotations

import pytest
from protocol_helpers import FdLedger

from vdev.protocol import (
    DeviceConfig,
    FrontendConnection,
    HeaderFlag,
    LocalProtocolError,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    RemoteProtocolError,
    Request,
    VringFile,
    VringState,
)
from vdev.protocol.framing import encode_message
from vdev.protocol.messages import U64

REPLY = HeaderFlag.VERSION | HeaderFlag.REPLY


def test_send_encodes_header_and_payload() -> None:
    frontend = FrontendConnection()
    data = frontend.send(Request.SET_VRING_NUM, VringState(1, 128), need_reply=True)
    flags = HeaderFlag.VERSION | HeaderFlag.NEED_REPLY
    assert data == encode_message(Request.SET_VRING_NUM, flags, VringState(1, 128).encode())
    assert frontend.pending_replies == 0  # no REPLY_ACK sent yet
    assert frontend.send(Request.SET_VRING_ENDIAN, b"") == encode_message(
        Request.SET_VRING_ENDIAN, 1
    )


def test_reply_expectations_follow_reply_ack() -> None:
    frontend = FrontendConnection()
    frontend.send(Request.GET_FEATURES)
    frontend.send(Request.SET_PROTOCOL_FEATURES, int(ProtocolFeature.REPLY_ACK), need_reply=True)
    assert frontend.reply_ack
    frontend.send(Request.SET_OWNER, need_reply=True)
    frontend.send(Request.GET_VRING_BASE, VringState(0, 0), need_reply=True)
    frontend.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    assert frontend.pending_replies == 4
    frontend.receive_data(
        encode_message(Request.GET_FEATURES, REPLY, U64.pack(7))
        + encode_message(Request.SET_PROTOCOL_FEATURES, REPLY, U64.pack(0))
        + encode_message(Request.SET_OWNER, REPLY, U64.pack(1))
        + encode_message(Request.GET_VRING_BASE, REPLY, VringState(0, 9).encode())
    )
    replies = []
    while (reply := frontend.next_reply()) is not None:
        replies.append((reply.request, reply.payload))
    assert replies == [
        (Request.GET_FEATURES, 7),
        (Request.SET_PROTOCOL_FEATURES, 0),
        (Request.SET_OWNER, 1),
        (Request.GET_VRING_BASE, VringState(0, 9)),
    ]


@pytest.mark.parametrize(
    ("request_", "payload", "nfds", "text"),
    [
        (Request.SET_VRING_NUM, 5, 0, "must be VringState"),
        (Request.SET_FEATURES, None, 0, "must be int"),
        (Request.SEND_RARP, b"\0" * 8, 0, "MAC address is 6 bytes"),
        (Request.SET_VRING_KICK, VringFile(0, True), 0, "0 fds, expected one fd unless"),
        (Request.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, 1, 0, 0),)), 2, "2 fds"),
        (Request.GET_FEATURES, None, 1, "1 fds, expected no fd"),
        (Request.SET_VRING_ENDIAN, 5, 0, "payload must be raw bytes"),
        (Request.SET_LOG_BASE, 5, 1, "must be LogDescription"),
        (Request.SET_VRING_ENDIAN, None, 9, "9 fds, at most 8"),
    ],
)
def test_send_rejects_misuse(request_: Request, payload: object, nfds: int, text: str) -> None:
    with pytest.raises(LocalProtocolError, match=text):
        FrontendConnection().send(request_, payload, list(range(100, 100 + nfds)))


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        (encode_message(Request.GET_STATUS, REPLY, U64.pack(1)), "got a reply to request 40"),
        (encode_message(Request.GET_FEATURES, HeaderFlag.VERSION, U64.pack(1)), "reply flag"),
        (encode_message(Request.GET_FEATURES, REPLY, b"\0" * 4), "payload is 4 bytes"),
        (encode_message(Request.GET_FEATURES, 0, U64.pack(1)), "bad protocol version"),
    ],
)
def test_bad_replies(reply: bytes, text: str) -> None:
    frontend = FrontendConnection()
    frontend.send(Request.GET_FEATURES)
    frontend.receive_data(reply)
    with pytest.raises(RemoteProtocolError, match=text) as info:
        frontend.next_reply()
    assert info.value.fatal


def test_unsolicited_reply_and_reply_fds(ledger: FdLedger) -> None:
    frontend = FrontendConnection(close_fd=ledger.close)
    frontend.receive_data(encode_message(Request.GET_FEATURES, REPLY, U64.pack(1)))
    with pytest.raises(RemoteProtocolError, match="reply to no request"):
        frontend.next_reply()
    frontend = FrontendConnection(close_fd=ledger.close)
    frontend.send(Request.GET_FEATURES)
    fds = ledger.new(2)
    frontend.receive_data(encode_message(Request.GET_FEATURES, REPLY, U64.pack(1)), fds)
    with pytest.raises(RemoteProtocolError, match="reply carries 2 fds, not 0"):
        frontend.next_reply()
    assert ledger.open == set()
    frontend.receive_data(b"\0", ledger.new())
    frontend.close()
    assert ledger.open == set()


def test_empty_config_reply_is_an_error_indication() -> None:
    frontend = FrontendConnection()
    frontend.send(Request.GET_CONFIG, DeviceConfig(0, 4, 0, bytes(4)))
    frontend.receive_data(encode_message(Request.GET_CONFIG, REPLY))
    reply = frontend.next_reply()
    assert reply is not None and reply.payload is None
