"""The back-end channel, sans-I/O: back-end requests, front-end replies, garbage."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_helpers import FdLedger

from vdev.protocol import (
    BackendChannel,
    BackendRequest,
    FrontendChannel,
    HeaderFlag,
    LocalProtocolError,
    RemoteProtocolError,
)
from vdev.protocol.framing import encode_message

REPLY = HeaderFlag.VERSION | HeaderFlag.REPLY
CONFIG_CHANGE = BackendRequest.CONFIG_CHANGE_MSG


def u64(value: int) -> bytes:
    return struct.pack("=Q", value)


def test_config_change_wire_format() -> None:
    channel = BackendChannel()
    assert channel.send(CONFIG_CHANGE) == struct.pack("=III", 2, 0x1, 0)
    assert channel.pending_replies == 0
    assert channel.send(CONFIG_CHANGE, need_reply=True) == struct.pack("=III", 2, 0x9, 0)
    assert channel.pending_replies == 1


@pytest.mark.parametrize(("result", "ok"), [(0, True), (1, False), (2**64 - 1, False)])
def test_round_trip_with_ack(ledger: FdLedger, result: int, ok: bool) -> None:
    backend = BackendChannel(close_fd=ledger.close)
    frontend = FrontendChannel(close_fd=ledger.close)
    frontend.receive_data(backend.send(CONFIG_CHANGE, need_reply=True))
    msg = frontend.next_request()
    assert msg is not None
    assert (msg.request, msg.payload, msg.need_reply) == (CONFIG_CHANGE, None, True)
    assert frontend.next_request() is None
    backend.receive_data(frontend.reply(msg, result))
    reply = backend.next_reply()
    assert reply is not None
    assert (reply.request, reply.result, reply.ok) == (CONFIG_CHANGE, result, ok)
    assert backend.pending_replies == 0
    assert backend.next_reply() is None


def test_replies_arrive_in_pieces() -> None:
    backend = BackendChannel()
    backend.send(CONFIG_CHANGE, need_reply=True)
    backend.send(CONFIG_CHANGE, need_reply=True)
    data = encode_message(CONFIG_CHANGE, REPLY, u64(0)) * 2
    results = []
    for byte in data:
        backend.receive_data(bytes([byte]))
        while (reply := backend.next_reply()) is not None:
            results.append(reply.ok)
    assert results == [True, True]


def test_front_end_refuses_to_ack_what_asked_for_no_ack() -> None:
    frontend = FrontendChannel()
    frontend.receive_data(BackendChannel().send(CONFIG_CHANGE))
    msg = frontend.next_request()
    assert msg is not None and not msg.need_reply
    with pytest.raises(LocalProtocolError, match="did not ask for a reply"):
        frontend.reply(msg)


@pytest.mark.parametrize(
    ("request_", "payload"),
    [(BackendRequest.IOTLB_MSG, None), (BackendRequest.VRING_CALL, None), (CONFIG_CHANGE, 5)],
)
def test_back_end_misuse(request_: BackendRequest, payload: object) -> None:
    with pytest.raises(LocalProtocolError):
        BackendChannel().send(request_, payload)


# (raw reply bytes, fds, error text) for a channel awaiting one CONFIG_CHANGE_MSG ack.
BAD_REPLIES = [
    (encode_message(CONFIG_CHANGE, REPLY, b"\0" * 4), 0, "payload is 4 bytes, expected 8"),
    (encode_message(CONFIG_CHANGE, REPLY, b""), 0, "payload is 0 bytes, expected 8"),
    (encode_message(CONFIG_CHANGE, HeaderFlag.VERSION, u64(0)), 0, "reply flag missing"),
    (encode_message(3, REPLY, u64(0)), 0, "reply to VRING_HOST_NOTIFIER_MSG for CONFIG_CHANGE"),
    (encode_message(99, REPLY, u64(0)), 0, "reply to back-end request 99"),
    (encode_message(CONFIG_CHANGE, REPLY, u64(0)), 1, "carries fds"),
    (encode_message(CONFIG_CHANGE, 0x2 | HeaderFlag.REPLY, u64(0)), 0, "bad protocol version"),
    (struct.pack("=III", 2, REPLY, 1 << 20), 0, "exceeds"),
]


@pytest.mark.parametrize(("data", "nfds", "text"), BAD_REPLIES)
def test_bad_replies(ledger: FdLedger, data: bytes, nfds: int, text: str) -> None:
    backend = BackendChannel(close_fd=ledger.close)
    backend.send(CONFIG_CHANGE, need_reply=True)
    backend.receive_data(data, ledger.new(nfds))
    with pytest.raises(RemoteProtocolError, match=text) as info:
        backend.next_reply()
    assert str(info.value).startswith("back-end channel: ")
    assert ledger.open == set(), "fds that came with a bad reply are closed"


def test_reply_to_no_request() -> None:
    backend = BackendChannel()
    backend.send(CONFIG_CHANGE)  # no ack asked for
    backend.receive_data(encode_message(CONFIG_CHANGE, REPLY, u64(0)))
    with pytest.raises(RemoteProtocolError, match="reply to no request"):
        backend.next_reply()


def test_close_releases_fds_not_handed_out(ledger: FdLedger) -> None:
    backend = BackendChannel(close_fd=ledger.close)
    backend.receive_data(b"\x02\0", ledger.new(2))  # half a header, with fds
    assert backend.next_reply() is None
    backend.close()
    assert ledger.open == set()


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (encode_message(1, HeaderFlag.VERSION), "unknown request 1"),
        (encode_message(77, HeaderFlag.VERSION), "unknown request 77"),
        (encode_message(CONFIG_CHANGE, REPLY), "has the reply flag"),
        (encode_message(CONFIG_CHANGE, HeaderFlag.VERSION, b"x"), "payload is 1 bytes"),
    ],
)
def test_front_end_rejects_bad_requests(data: bytes, text: str) -> None:
    frontend = FrontendChannel()
    frontend.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=text):
        frontend.next_request()


@given(st.binary(max_size=64))
def test_garbage_never_escapes_as_anything_but_a_protocol_error(data: bytes) -> None:
    backend = BackendChannel()
    backend.send(CONFIG_CHANGE, need_reply=True)
    backend.receive_data(data)
    try:
        while backend.next_reply() is not None:
            pass
    except RemoteProtocolError:
        pass
