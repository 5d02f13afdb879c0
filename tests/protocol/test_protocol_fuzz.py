"""Hostile input: random streams and fds never escape as anything but ProtocolError,
and never leak, double-close or steal an fd."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_helpers import PAYLOADS, FdLedger, Session

from vdev.protocol import (
    DeviceConfig,
    HeaderFlag,
    MemoryRegion,
    MemoryTable,
    Message,
    ProtocolError,
    RemoteProtocolError,
    Request,
    VringState,
)
from vdev.protocol.framing import HEADER, encode_message
from vdev.protocol.messages import encode_payload
from vdev.protocol.rules import RULES

V = HeaderFlag.VERSION
FLAGS = st.sampled_from([V, V | HeaderFlag.NEED_REPLY, V | HeaderFlag.REPLY, 0, 2, 0xFFFF_FFF9])


def result_for(event: Message) -> object:
    """A result complete() accepts for ``event``."""
    match event.payload:
        case VringState(index=index) if event.request is Request.GET_VRING_BASE:
            return VringState(index, 0)
        case DeviceConfig(size=size) if event.request is Request.GET_CONFIG:
            return bytes(size)
    return 0 if event.request in (Request.GET_STATUS, Request.SET_LOG_BASE) else None


@st.composite
def message(draw: st.DrawFn) -> tuple[bytes, int]:
    """One message (well formed, subtly wrong or garbage) and how many fds go with it."""
    nfds = draw(st.sampled_from([0, 0, 0, 1, 1, 2, 8, 9]))
    request = draw(st.one_of(st.sampled_from(list(Request)), st.integers(0, 2**32 - 1)))
    rule = RULES.get(request) if request in Request._value2member_map_ else None
    if rule is not None and draw(st.booleans()):
        body = encode_payload(rule.payload, draw(PAYLOADS[rule.payload]))
    else:
        body = draw(st.binary(max_size=64))
    kind = draw(st.sampled_from(["message", "message", "message", "header", "junk"]))
    if kind == "header":  # a header whose size field lies
        return HEADER.pack(request, draw(FLAGS), draw(st.integers(0, 2**32 - 1))) + body, nfds
    if kind == "junk":
        return body, nfds
    return encode_message(request, draw(FLAGS), body), nfds


def negotiation() -> list[tuple[bytes, int]]:
    session = Session(FdLedger())
    requests = [
        (Request.GET_FEATURES, None),
        (Request.SET_PROTOCOL_FEATURES, session.backend.protocol_features),
        (Request.SET_OWNER, None),
    ]
    return [(session.frontend.send(r, p), 0) for r, p in requests]


def drive(session: Session, chunks: list[tuple[bytes, int]], rng: random.Random) -> set[int]:
    """Feed every chunk, handle every event; return the fds handed over in events."""
    handed: set[int] = set()
    backend = session.backend
    for data, nfds in chunks:
        backend.receive_data(data, session.ledger.new(nfds))
        while True:
            try:
                event = backend.next_event()
            except RemoteProtocolError as exc:
                if exc.fatal:
                    backend.close()
                    return handed
                continue
            if event is None:
                break
            handed.update(event.fds)
            if rng.random() < 0.3:
                if not backend.fail(event, "fuzz"):
                    backend.close()
                    return handed
            else:
                backend.complete(event, result_for(event))
        backend.data_to_send()
    backend.close()
    return handed


@settings(max_examples=300, deadline=None)
@given(
    st.booleans(),
    st.lists(message(), max_size=12),
    st.lists(st.integers(1, 64), min_size=1, max_size=8),
    st.randoms(use_true_random=False),
)
def test_random_streams_raise_only_protocol_errors_and_never_leak_fds(
    negotiate: bool,
    messages: list[tuple[bytes, int]],
    cuts: list[int],
    rng: random.Random,
) -> None:
    ledger = FdLedger()
    session = Session(ledger)
    stream = (negotiation() if negotiate else []) + messages
    # Re-chunk: each message's fds go with its first byte, chunk sizes vary.
    chunks: list[tuple[bytes, int]] = []
    for index, (data, nfds) in enumerate(stream):
        step = cuts[index % len(cuts)]
        pieces = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
        chunks.append((pieces[0], nfds))
        chunks.extend((piece, 0) for piece in pieces[1:])
    handed = drive(session, chunks, rng)
    closed = set(ledger.closed)
    assert len(closed) == len(ledger.closed), "an fd was closed twice"
    assert not handed & closed, "an fd handed to the caller was also closed"
    assert ledger.open == handed, "every fd is either handed over or closed"


def malformed(rng: random.Random) -> tuple[bytes, int]:
    """A message with exactly one thing wrong with it (or several)."""
    request = rng.choice([*Request, 0, 44, 99, 2**31])
    flags = rng.choice([V, V | HeaderFlag.NEED_REPLY, 0, 3, V | HeaderFlag.REPLY])
    size = rng.choice([0, 4, 7, 8, 9, 12, 40, 41, 264, 300])
    body = bytes(rng.getrandbits(8) for _ in range(size))
    nfds = rng.choice([0, 0, 1, 2, 9])
    if rng.random() < 0.05:
        return HEADER.pack(request, V, 1 << 20), nfds
    return encode_message(request, flags, body), nfds


def test_ten_thousand_malformed_messages_do_not_break_a_fresh_connection() -> None:
    rng = random.Random(1234)
    ledger = FdLedger()
    session = Session(ledger)
    session.negotiate()
    handed: set[int] = set()
    fatal = 0
    for _ in range(10_000):
        data, nfds = malformed(rng)
        handed |= drive_one(session, data, ledger.new(nfds))
        if session_dead(session):
            fatal += 1
            session = Session(ledger)
            session.negotiate()
    session.backend.close()
    assert 0 < fatal < 10_000
    assert ledger.open == handed

    fresh = Session(FdLedger())
    fresh.negotiate()
    fds = fresh.ledger.new()
    table = MemoryTable((MemoryRegion(0, 1 << 20, 0x7000_0000, 0),))
    event = fresh.send(Request.SET_MEM_TABLE, table, fds, need_reply=True)
    assert event is not None and event.fds == tuple(fds)
    fresh.backend.complete(event)
    assert [r.payload for r in fresh.replies()] == [0]


def drive_one(session: Session, data: bytes, fds: list[int]) -> set[int]:
    session.backend.receive_data(data, fds)
    handed: set[int] = set()
    while True:
        try:
            event = session.backend.next_event()
        except RemoteProtocolError:
            return handed
        if event is None:
            return handed
        handed.update(event.fds)
        session.backend.complete(event, result_for(event))


def session_dead(session: Session) -> bool:
    try:
        session.backend.next_event()
    except ProtocolError:
        session.backend.close()
        return True
    return False
