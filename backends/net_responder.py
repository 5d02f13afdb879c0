"""A pretend host on the guest's link: answers ARP and ping for one IPv4 address.

With it a guest can `ping 10.0.2.2` through a vdev NIC with no TAP, bridge or root.
Everything else the guest sends is counted and ignored.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import Sequence

from vdev.backend import BackendError, NetBackend
from vdev.net import join_frame, parse_mac

log = logging.getLogger(__name__)

ETH = struct.Struct("!6s6sH")
ARP = struct.Struct("!HHBBH6s4s6s4s")
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
BROADCAST = b"\xff" * 6


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """The RFC 1071 ones' complement checksum of `data`."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    # 2**16 == 1 (mod 0xffff): the ones' complement sum of the 16-bit words is the
    # big-endian integer modulo 0xffff, with 0 standing for 0xffff unless all is zero.
    total = int.from_bytes(data, "big") % 0xFFFF
    if total == 0 and any(data):
        total = 0xFFFF
    return 0xFFFF - total


class ResponderBackend(NetBackend):
    """Answers ARP requests and ICMP echo requests for `address`, as MAC `host_mac`.

    (Not `mac`: that option names the guest's MAC, for the device.)
    """

    def __init__(self, address: str = "10.0.2.2/24", host_mac: str = "52:55:0a:00:02:02") -> None:
        try:
            iface = ipaddress.ip_interface(address)
        except ValueError:
            raise BackendError(f"address: {address!r} is not like 10.0.2.2/24") from None
        if iface.version != 4:
            raise BackendError(f"address: {address!r} is not an IPv4 address")
        try:
            self.mac = parse_mac(host_mac)
        except ValueError as exc:
            raise BackendError(f"host_mac: {exc}") from None
        self.ip = iface.ip.packed
        self.arp_replies = 0
        self.echo_replies = 0
        self.ignored = 0

    def transmit(self, frames: list[Sequence[memoryview]]) -> int:
        dropped = 0
        for frame in frames:
            data = join_frame(frame)
            if data is None:
                dropped += 1
            else:
                self._answer(data)
        return dropped

    def _answer(self, data: bytes) -> None:
        reply = None
        if len(data) >= ETH.size:
            ethertype = data[12] << 8 | data[13]
            if ethertype == ETHERTYPE_ARP:
                reply = self._arp(data)
            elif ethertype == ETHERTYPE_IPV4 and data[0:6] in (self.mac, BROADCAST):
                reply = self._icmp(data)
        if reply is None:
            self.ignored += 1
        else:
            self.deliver(reply)

    def _arp(self, data: bytes) -> bytes | None:
        if len(data) < ETH.size + ARP.size:
            return None
        htype, ptype, hlen, plen, op, sha, spa, _, tpa = ARP.unpack_from(data, ETH.size)
        if (htype, ptype, hlen, plen, op) != (1, ETHERTYPE_IPV4, 6, 4, 1) or tpa != self.ip:
            return None
        self.arp_replies += 1
        reply = ETH.pack(sha, self.mac, ETHERTYPE_ARP) + ARP.pack(
            1, ETHERTYPE_IPV4, 6, 4, 2, self.mac, self.ip, sha, spa
        )
        return reply.ljust(60, b"\0")

    def _icmp(self, data: bytes) -> bytearray | None:
        ip = ETH.size
        ihl = (data[ip] & 0x0F) * 4
        if len(data) < ip + 20 or data[ip] >> 4 != 4 or ihl < 20:
            return None
        total = int.from_bytes(data[ip + 2 : ip + 4], "big")
        end = ip + total
        fragmented = int.from_bytes(data[ip + 6 : ip + 8], "big") & 0x3FFF
        if total < ihl + 8 or end > len(data) or fragmented or data[ip + 9] != 1:
            return None
        icmp = ip + ihl
        if data[ip + 16 : ip + 20] != self.ip or data[icmp] != ICMP_ECHO_REQUEST:
            return None
        if internet_checksum(data[ip:icmp]) or internet_checksum(data[icmp:end]):
            return None  # corrupted on the way: a real host would drop it too
        self.echo_replies += 1
        reply = bytearray(data[:end])
        reply[0:12] = data[6:12] + self.mac
        reply[ip + 8] = 64  # TTL
        reply[ip + 12 : ip + 20] = data[ip + 16 : ip + 20] + data[ip + 12 : ip + 16]
        reply[ip + 10 : ip + 12] = b"\0\0"
        reply[ip + 10 : ip + 12] = internet_checksum(reply[ip:icmp]).to_bytes(2, "big")
        reply[icmp] = ICMP_ECHO_REPLY
        reply[icmp + 2 : icmp + 4] = b"\0\0"
        reply[icmp + 2 : icmp + 4] = internet_checksum(reply[icmp:end]).to_bytes(2, "big")
        return reply
