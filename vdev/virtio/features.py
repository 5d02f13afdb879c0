"""Virtio transport feature bits (virtio 1.2, section 6 "Reserved Feature Bits")."""

from __future__ import annotations

from enum import IntFlag


class VirtioFeature(IntFlag):
    """Device-independent feature bits, as negotiated with the driver."""

    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40


#: The transport features vdev's rings implement (offered to every driver).
TRANSPORT_FEATURES = (
    VirtioFeature.RING_INDIRECT_DESC
    | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.VERSION_1
    | VirtioFeature.RING_PACKED
)
