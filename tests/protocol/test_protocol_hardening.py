"""Regression tests for the protocol side of the hardening issue (11)."""

from __future__ import annotations

import pytest
from protocol_helpers import FEATURES, Session

from vdev.protocol import VIRTIO_F_RING_PACKED, RemoteProtocolError, Request, VringAddress

DESC, USED, AVAIL = 0x7F00_0010_0000, 0x7F00_0010_2000, 0x7F00_0010_1000


def _use_packed(session: Session) -> None:
    event = session.send(Request.SET_FEATURES, FEATURES | VIRTIO_F_RING_PACKED)
    assert event is not None
    session.backend.complete(event)


@pytest.mark.parametrize(
    ("packed", "desc", "used", "avail", "text"),
    [
        (False, DESC + 8, USED, AVAIL, "descriptor table address 0x7f0000100008 is not 16-byte"),
        (False, DESC, USED + 2, AVAIL, "device area address 0x7f0000102002 is not 4-byte"),
        (False, DESC, USED, AVAIL + 1, "driver area address 0x7f0000101001 is not 2-byte"),
        (True, DESC + 4, USED, AVAIL, "descriptor table address 0x7f0000100004 is not 16-byte"),
        (True, DESC, USED + 2, AVAIL, "device area address 0x7f0000102002 is not 4-byte"),
        (True, DESC, USED, AVAIL + 2, "driver area address 0x7f0000101002 is not 4-byte"),
    ],
)
def test_misaligned_ring_addresses_are_refused(
    session: Session, packed: bool, desc: int, used: int, avail: int, text: str
) -> None:
    if packed:
        _use_packed(session)
    with pytest.raises(RemoteProtocolError, match=text):
        session.send(Request.SET_VRING_ADDR, VringAddress(0, 0, desc, used, avail, 0))


@pytest.mark.parametrize("packed", [False, True])
def test_aligned_ring_addresses_are_accepted(session: Session, packed: bool) -> None:
    if packed:
        _use_packed(session)
    # The tightest layout each ring format allows.
    avail = AVAIL + (4 if packed else 2)
    address = VringAddress(0, 0, DESC + 16, USED + 4, avail, 0)
    event = session.send(Request.SET_VRING_ADDR, address)
    assert event is not None and event.payload == address
