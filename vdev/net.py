"""The virtio-net wire format, for net backends and the net device model alike.

Exports:

- `NetFeature`: virtio-net feature bits (what a backend's `offload_features` holds);
- `HdrFlag`, `GsoType`, `NET_HDR`, `NUM_BUFFERS`: struct virtio_net_hdr, its flags and
  GSO types (a `vnet_hdr` backend sees this header in front of every frame);
- `vnet_hdr_len(features)`: the header's size for negotiated features (12, or 10);
- `ETH_HLEN`, `VLAN_HLEN`, `MAX_FRAME`, `MAX_TX_FRAME`: frame size limits;
- `frame_len(frame)`, `join_frame(frame)`: a transmitted frame's scatter list, measured
  or copied into one piece;
- `parse_mac(text)`, `format_mac(mac)`: MAC addresses between text and 6 bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import IntEnum, IntFlag

from vdev.virtio.features import VirtioFeature

__all__ = [
    "ETH_HLEN",
    "MAX_FRAME",
    "MAX_TX_FRAME",
    "NET_HDR",
    "NUM_BUFFERS",
    "VLAN_HLEN",
    "GsoType",
    "HdrFlag",
    "NetFeature",
    "format_mac",
    "frame_len",
    "join_frame",
    "parse_mac",
    "vnet_hdr_len",
]


class NetFeature(IntFlag):
    """virtio-net feature bits (virtio 1.2, 5.1.3)."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23


class HdrFlag(IntFlag):
    """`flags` of struct virtio_net_hdr."""

    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class GsoType(IntEnum):
    """`gso_type` of struct virtio_net_hdr."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5
    ECN = 0x80


#: struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
#: num_buffers (the last field only with VERSION_1 or MRG_RXBUF).
NET_HDR = struct.Struct("<BBHHHHH")
NUM_BUFFERS = struct.Struct("<H")

ETH_HLEN = 14
VLAN_HLEN = 4
#: The largest frame a driver may receive: a 64 KiB IP packet (GSO) in a tagged frame.
MAX_FRAME = 0xFFFF + ETH_HLEN + VLAN_HLEN
#: ... and the largest a backend is handed, with a virtio-net header in front.
MAX_TX_FRAME = MAX_FRAME + NET_HDR.size


def vnet_hdr_len(features: int) -> int:
    """Size of the virtio-net header the driver uses with `features` (12 or legacy 10)."""
    if features & (VirtioFeature.VERSION_1 | NetFeature.MRG_RXBUF):
        return NET_HDR.size
    return NET_HDR.size - NUM_BUFFERS.size


def frame_len(frame: Sequence[memoryview]) -> int:
    """Bytes in a scatter list (summed, nothing copied)."""
    return frame[0].nbytes if len(frame) == 1 else sum(v.nbytes for v in frame)


def join_frame(frame: Sequence[memoryview]) -> bytes | None:
    """A copy of a transmitted frame in one piece, or None (nothing copied) if it is
    larger than any frame may be (for backends that look into frames)."""
    return None if frame_len(frame) > MAX_TX_FRAME else b"".join(frame)


def parse_mac(text: str | bytes) -> bytes:
    """b"\\x52\\x54..." from "52:54:00:12:34:56" (or 6 raw bytes); ValueError if malformed."""
    if isinstance(text, bytes):
        if len(text) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(text)}")
        return text
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) in (1, 2) for p in parts):
        raise ValueError(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a MAC address like 52:54:00:12:34:56") from None


def format_mac(mac: bytes) -> str:
    """ "52:54:00:12:34:56" from 6 bytes."""
    return ":".join(f"{b:02x}" for b in mac)
