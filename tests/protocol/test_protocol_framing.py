"""Framing: partial reads, fd attribution, fatal framing errors and fd hygiene."""

from __future__ import annotations

import os

import pytest
from protocol_helpers import FdLedger, Session

from vdev.protocol import (
    BackendConnection,
    HeaderFlag,
    LocalProtocolError,
    MemoryRegion,
    MemoryTable,
    RemoteProtocolError,
    Request,
    VringFile,
    VringState,
)
from vdev.protocol.framing import HEADER, MAX_PAYLOAD_SIZE, FrameReader, encode_message

V = HeaderFlag.VERSION


def kick(index: int, flags: int = V) -> bytes:
    return encode_message(Request.SET_VRING_KICK, flags, VringFile(index, True).encode())


def test_reader_waits_for_a_whole_message() -> None:
    reader = FrameReader()
    data = encode_message(Request.SET_VRING_NUM, V, VringState(0, 8).encode())
    for byte in data[:-1]:
        reader.feed(bytes([byte]))
        assert reader.next_message() is None
    reader.feed(data[-1:])
    raw = reader.next_message()
    assert raw is not None
    assert (raw.request, raw.flags, raw.payload, raw.fds) == (8, V, VringState(0, 8).encode(), ())
    assert reader.next_message() is None


def test_fds_follow_the_header_of_their_chunk(session: Session, ledger: FdLedger) -> None:
    first, second = ledger.new(2)
    # Byte by byte, fds with the first byte.
    message = kick(0)
    session.backend.receive_data(message[:1], [first])
    for byte in message[1:]:
        assert session.backend.next_event() is None
        session.backend.receive_data(bytes([byte]))
    event = session.backend.next_event()
    assert event is not None and event.fds == (first,)
    session.backend.complete(event)
    # A chunk holding the tail of one message and all of the next: fds go to the next.
    message = kick(1, V | HeaderFlag.NEED_REPLY)
    session.backend.receive_data(message[:5])
    session.backend.receive_data(message[5:] + kick(0), [second])
    assert ledger.open == {first, second}  # nothing closed so far
    with pytest.raises(RemoteProtocolError, match="0 fds") as info:
        session.backend.next_event()  # kick(1) claims no fd: it started before the chunk
    assert not info.value.fatal
    assert ledger.open == {first, second}
    event = session.backend.next_event()
    assert event is not None and event.fds == (second,)


def test_one_chunk_with_two_messages_gives_the_fds_to_the_first(
    session: Session, ledger: FdLedger
) -> None:
    fds = ledger.new(2)
    region = MemoryRegion(0, 4096, 0, 0)
    data = encode_message(Request.SET_MEM_TABLE, V, MemoryTable((region, region)).encode())
    session.backend.receive_data(data + kick(1)[:3], fds)
    event = session.backend.next_event()
    assert event is not None and event.fds == tuple(fds)
    session.backend.complete(event)
    assert session.backend.next_event() is None


@pytest.mark.parametrize("flags", [0, 2, 3, HeaderFlag.REPLY])
def test_bad_version_is_fatal_and_closes_everything(
    session: Session, ledger: FdLedger, flags: int
) -> None:
    early, late, after = ledger.new(3)
    bad = encode_message(Request.SET_VRING_ENABLE, flags, VringState(0, 1).encode())
    session.backend.receive_data(bad, [early])
    session.backend.receive_data(kick(0), [late])
    with pytest.raises(RemoteProtocolError, match="bad protocol version") as info:
        session.backend.next_event()
    assert info.value.fatal and info.value.request is Request.SET_VRING_ENABLE
    assert ledger.open == {after}
    session.backend.receive_data(kick(0), [after])
    assert ledger.open == set()
    with pytest.raises(RemoteProtocolError, match="unusable"):
        session.backend.next_event()


def test_absurd_size_is_fatal_without_waiting_for_the_payload(session: Session) -> None:
    header = HEADER.pack(Request.SET_CONFIG, V | HeaderFlag.NEED_REPLY, MAX_PAYLOAD_SIZE + 1)
    session.backend.receive_data(header)
    with pytest.raises(RemoteProtocolError, match=f"payload size {MAX_PAYLOAD_SIZE + 1}") as info:
        session.backend.next_event()
    assert info.value.fatal
    assert session.backend.data_to_send() == b""


def test_too_many_fds_is_fatal_even_with_reply_ack(session: Session, ledger: FdLedger) -> None:
    fds = ledger.new(9)
    flags = V | HeaderFlag.NEED_REPLY
    session.backend.receive_data(encode_message(Request.SET_OWNER, flags), fds)
    with pytest.raises(RemoteProtocolError, match="9 fds, at most 8") as info:
        session.backend.next_event()
    assert info.value.fatal
    assert ledger.open == set()
    assert session.backend.data_to_send() == b""


def test_close_releases_fds_of_a_partial_message(session: Session, ledger: FdLedger) -> None:
    fds = ledger.new(2)
    session.backend.receive_data(kick(0)[:7], fds[:1])
    session.backend.receive_data(b"", fds[1:])
    assert session.backend.next_event() is None
    session.backend.close()
    assert ledger.open == set()
    session.backend.close()
    with pytest.raises(LocalProtocolError, match="closed"):
        session.backend.next_event()


def test_real_fds_are_closed_or_handed_over() -> None:
    backend = BackendConnection(features=1 << 30, protocol_features=0, num_queues=1)
    rejected, kept = os.pipe()
    try:
        backend.receive_data(encode_message(Request.SET_OWNER, V))
        assert backend.next_event() is None
        backend.receive_data(kick(0), [kept])
        event = backend.next_event()
        assert event is not None and event.fds == (kept,)
        backend.complete(event)
        backend.receive_data(encode_message(Request.SET_OWNER, V), [rejected])
        with pytest.raises(RemoteProtocolError, match="SET_OWNER: 1 fds"):
            backend.next_event()
        with pytest.raises(OSError):
            os.fstat(rejected)
        os.fstat(kept)
    finally:
        os.close(kept)
