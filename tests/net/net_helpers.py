"""A NetDevice driven over fake guest memory through real Vrings and eventfds."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Sequence

import trio

from vdev.backend import NetBackend
from vdev.devices.net import NET_HDR, NetDevice, NetFeature
from vdev.protocol import VringAddress
from vdev.testing.driver_rings import DriverPackedRing, DriverSplitRing, UsedBuffer, _Element
from vdev.testing.fakemem import FakeGuestMemory
from vdev.virtio.features import VirtioFeature
from vdev.vring import Vring
from vdev.worker import QueueWorkers

BASE_FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX
MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")
BROADCAST = b"\xff" * 6


def eth_frame(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame (0x88b5: the IEEE local experimental ethertype)."""
    return dst + src + struct.pack("!H", ethertype) + payload


def udp4_frame(src_ip: bytes, dst_ip: bytes, sport: int, dport: int, size: int = 64) -> bytes:
    """A minimal IPv4/UDP frame (checksums left zero) for flow-hash tests."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, src_ip, dst_ip)
    udp = struct.pack("!HHHH", sport, dport, 8, 0)
    return eth_frame(MAC_B, MAC_A, ip + udp, 0x0800).ljust(size, b"\0")


def naive_checksum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way (reference for the fast one)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(dst_mac: bytes, src: str, dst: str, payload: bytes, options: bytes = b"") -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 7) + payload
    icmp = icmp[:2] + naive_checksum(icmp).to_bytes(2, "big") + icmp[4:]
    ihl = (20 + len(options)) // 4
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl, 0, ihl * 4 + len(icmp), 99, 0, 64, 1, 0,
        ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
    ) + options  # fmt: skip
    ip = ip[:10] + naive_checksum(ip).to_bytes(2, "big") + ip[12:]
    return eth_frame(dst_mac, MAC_A, ip + icmp, 0x0800)


def arp_request(sender_mac: bytes, sender_ip: str, target_ip: str) -> bytes:
    arp = struct.pack(
        "!HHBBH6s4s6s4s",
        1, 0x0800, 6, 4, 1,
        sender_mac, ipaddress.ip_address(sender_ip).packed,
        bytes(6), ipaddress.ip_address(target_ip).packed,
    )  # fmt: skip
    return eth_frame(BROADCAST, sender_mac, arp, 0x0806)


def hdr_fields(data: bytes) -> tuple[int, ...]:
    return NET_HDR.unpack_from(data)


class Rig:
    """The driver side of a NetDevice: one ring per queue, real `Vring`s as its Queues."""

    def __init__(
        self,
        device: NetDevice,
        *,
        features: int,
        packed: bool = False,
        size: int = 64,
        mem_size: int = 8 << 20,
    ) -> None:
        self.device = device
        self.features = features | BASE_FEATURES | (VirtioFeature.RING_PACKED if packed else 0)
        self.mem = FakeGuestMemory(mem_size, regions=2)
        ring_cls = DriverPackedRing if packed else DriverSplitRing
        self.rings = [
            ring_cls(self.mem, size, features=self.features) for _ in range(device.num_queues)
        ]
        self.vrings: list[Vring] = []
        #: Where each stopped queue left off (GET_VRING_BASE), to restart it there.
        self.bases = {index: ring.base for index, ring in enumerate(self.rings)}
        #: Used buffers collected but not yet consumed by a test, per queue.
        self.used: list[list[UsedBuffer]] = [[] for _ in self.rings]

    async def start(self, nursery: trio.Nursery, queues: Sequence[int] | None = None) -> None:
        self.device.set_features(self.features)
        self.workers = QueueWorkers(self.device, nursery)
        for index in range(self.device.num_queues) if queues is None else queues:
            await self.start_queue(index)
        await self.settle()  # the workers started the queues (frames are taken from now)

    async def start_queue(self, index: int) -> Vring:
        ring = self.rings[index]
        vring = Vring(index)
        vring.size = ring.size
        vring.address = VringAddress(index, 0, ring.desc_addr, ring.used_addr, ring.avail_addr, 0)
        vring.base = self.bases[index]
        vring.set_kick(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        vring.set_call(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        vring.started = vring.enabled = True
        await vring.start(self.workers, self.mem, self.features)
        self.vrings.append(vring)
        return vring

    def vring(self, index: int) -> Vring:
        return next(v for v in self.vrings if v.index == index)

    async def stop(self) -> None:
        for vring in self.vrings:
            await vring.stop()
            self.bases[vring.index] = vring.base
            vring.close()
        self.vrings.clear()

    def kick(self, index: int) -> None:
        if self.rings[index].kick_needed():
            os.eventfd_write(self.vring(index).kick_fd, 1)  # type: ignore[arg-type]

    def add_rx(self, pair: int, sizes: Sequence[int], count: int = 1) -> list[int]:
        """Post `count` receive chains, each of writable buffers of `sizes`."""
        tokens = [self.rings[2 * pair].add([], list(sizes)) for _ in range(count)]
        self.kick(2 * pair)
        return tokens

    def send(self, pair: int, frame: bytes, *, header: bytes | None = None, split: int = 0) -> int:
        """Transmit `frame` (after a zero header unless given); `split`: header and
        frame in separate descriptors, the frame cut at that offset too."""
        hdr = bytes(self.device._hdr_len) if header is None else header
        parts = [hdr + frame] if not split else [hdr, frame[:split], frame[split:]]
        token = self.rings[2 * pair + 1].add(parts, [])
        self.kick(2 * pair + 1)
        return token

    def send_aliased(self, pair: int, gpa: int, length: int, count: int) -> None:
        """Transmit one chain of `count` descriptors that all point at the same `length`
        bytes at `gpa`: a huge frame in little memory."""
        ring = self.rings[2 * pair + 1]
        ring._reserve(count)
        elements = tuple(_Element(gpa, length, writable=False) for _ in range(count))
        ring._publish(next(ring._tokens), elements, (), None)
        self.kick(2 * pair + 1)

    async def wait_used(self, index: int, count: int, timeout: float = 5) -> list[UsedBuffer]:
        """The next `count` used buffers of queue `index` (fails after `timeout`)."""
        pending = self.used[index]
        with trio.fail_after(timeout):
            while True:
                pending.extend(self.rings[index].get_used())
                if len(pending) >= count:
                    done, pending[:] = pending[:count], pending[count:]
                    return done
                call = self.vring(index).call_fd
                assert call is not None
                with trio.move_on_after(0.02):
                    await trio.lowlevel.wait_readable(call)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(call)

    async def receive(self, pair: int, count: int = 1) -> list[bytes]:
        """The next `count` frames received on `pair` (header included), merging the
        buffers of a frame as num_buffers says."""
        frames = []
        for _ in range(count):
            [first] = await self.wait_used(2 * pair, 1)
            data = b"".join(first.data)
            num_buffers = hdr_fields(data)[6] if self.features & NetFeature.MRG_RXBUF else 1
            for more in await self.wait_used(2 * pair, num_buffers - 1) if num_buffers > 1 else []:
                data += b"".join(more.data)
            frames.append(data)
        return frames

    async def settle(self, timeout: float = 5) -> None:
        """Wait until every queue worker has gone to sleep (nothing left to do)."""
        await trio.sleep(0.02)  # let the workers see what the test just did
        with trio.fail_after(timeout):
            while not all(v.idle for v in self.vrings):
                await trio.sleep(0.002)


class FdBackend(NetBackend):
    """A backend over one end of a SOCK_SEQPACKET pair: the test holds the other end."""

    def __init__(self, *, vnet_hdr: bool = False, offloads: int = 0) -> None:
        self.vnet_hdr = vnet_hdr
        self.offload_features = offloads
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        self.peer.setblocking(False)
        self.features: list[int] = []

    def set_features(self, features: int) -> None:
        self.features.append(features)

    def transmit(self, frames: list[Sequence[memoryview]]) -> None:
        for frame in frames:
            os.writev(self.sock.fileno(), frame)

    def fileno(self, pair: int = 0) -> int | None:
        return self.sock.fileno() if pair == 0 else None

    def receive_into(self, buffers: Sequence[memoryview], pair: int = 0) -> int:
        return os.readv(self.sock.fileno(), buffers)

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


class ListBackend(NetBackend):
    """Records transmitted frames; the test calls `deliver` itself."""

    def __init__(self, *, vnet_hdr: bool = False, offloads: int = 0) -> None:
        self.vnet_hdr = vnet_hdr
        self.offload_features = offloads
        self.sent: list[bytes] = []

    def transmit(self, frames: list[Sequence[memoryview]]) -> None:
        self.sent += (b"".join(frame) for frame in frames)
