"""NetDevice over fake guest memory, split and packed rings, real Vrings and eventfds."""

from __future__ import annotations

import struct
import threading
import tracemalloc

import pytest
import trio
from net_helpers import (
    MAC_A,
    MAC_B,
    FdBackend,
    ListBackend,
    Rig,
    eth_frame,
    hdr_fields,
    udp4_frame,
)
from vdev_backends.net_echo import EchoBackend

from vdev.devices.net import (
    NET_CONFIG,
    NET_HDR,
    GsoType,
    HdrFlag,
    NetDevice,
    NetFeature,
    consistent_offloads,
    flow_hash,
    parse_mac,
    rarp_announce,
    vnet_hdr_len,
)
from vdev.protocol import ProtocolFeature, Request
from vdev.virtio.features import VirtioFeature

MRG = NetFeature.MRG_RXBUF
RINGS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


def swapped(frame: bytes) -> bytes:
    return frame[6:12] + frame[0:6] + frame[12:]


# --- echo, byte for byte -------------------------------------------------------------


@RINGS
@pytest.mark.parametrize("mrg", [False, True], ids=["plain", "mrg"])
async def test_echo_byte_for_byte(packed: bool, mrg: bool) -> None:
    device = NetDevice(EchoBackend())
    rig = Rig(device, features=MRG if mrg else 0, packed=packed)
    frames = [eth_frame(MAC_B, MAC_A, bytes([i]) * n) for i, n in enumerate([46, 100, 1486, 7])]
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [1526], count=8)
        for i, frame in enumerate(frames):
            rig.send(0, frame, split=i % 2 and 10)
        sent = await rig.wait_used(1, len(frames))
        assert [u.written for u in sent] == [0] * len(frames)
        received = await rig.receive(0, len(frames))
        await rig.stop()
        nursery.cancel_scope.cancel()
    for got, frame in zip(received, frames, strict=True):
        assert got[:12] == NET_HDR.pack(0, 0, 0, 0, 0, 0, 1)
        assert got[12:] == swapped(frame)
    stats = device.stats()
    assert stats["tx0_frames"] == stats["rx0_frames"] == len(frames)
    assert stats["tx0_bytes"] == stats["rx0_bytes"] == sum(map(len, frames))
    assert not [key for key in stats if key.startswith("drop_")]


@RINGS
async def test_legacy_header_is_10_bytes(packed: bool) -> None:
    device = NetDevice(EchoBackend(), mrg_rxbuf=False)
    rig = Rig(device, features=0, packed=packed)
    rig.features &= ~int(VirtioFeature.VERSION_1)
    frame = eth_frame(MAC_B, MAC_A, b"legacy" * 10)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [1524])
        rig.send(0, frame)
        [got] = await rig.receive(0)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert got == bytes(10) + swapped(frame)


# --- receive side: MRG_RXBUF, oversize, starvation, backlog ----------------------------


@RINGS
async def test_mrg_rxbuf_spreads_a_frame_over_chains(packed: bool) -> None:
    backend = ListBackend()
    device = NetDevice(backend)
    rig = Rig(device, features=MRG, packed=packed)
    frame = eth_frame(MAC_B, MAC_A, bytes(range(256)) * 4)  # 1038 bytes + 12 of header
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [100, 156], count=6)  # chains of 256 bytes, two buffers each
        assert backend.deliver(frame)
        used = await rig.wait_used(0, 5)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert [u.written for u in used] == [256, 256, 256, 256, 1050 - 4 * 256]
    data = b"".join(b"".join(u.data) for u in used)
    assert hdr_fields(data) == (0, 0, 0, 0, 0, 0, 5)
    assert data[12:] == frame
    [unused] = rig.rings[0].get_used()  # the pooled sixth chain, given back at stop
    assert unused.written == 0
    assert device.stats()["rx0_frames"] == 1


@RINGS
async def test_oversized_frame_is_dropped_and_counted(packed: bool) -> None:
    backend = ListBackend()
    device = NetDevice(backend, mrg_rxbuf=False)
    rig = Rig(device, features=0, packed=packed)
    big = eth_frame(MAC_B, MAC_A, bytes(600))
    small = eth_frame(MAC_B, MAC_A, b"fits")
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [300, 300])  # one chain of 600 bytes: the header does not fit too
        assert backend.deliver(big)
        assert backend.deliver(small)
        [used] = await rig.wait_used(0, 1)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert used.written == 12 + len(small)
    assert b"".join(used.data)[12:] == small
    stats = device.stats()
    assert stats["drop_rx_oversize"] == 1
    assert stats["rx0_frames"] == 1


async def test_frames_wait_for_buffers_then_backlog_overflows() -> None:
    backend = ListBackend()
    device = NetDevice(backend, rx_backlog=3)
    rig = Rig(device, features=MRG)
    frames = [eth_frame(MAC_B, MAC_A, bytes([i]) * 50) for i in range(5)]
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        await rig.settle()
        results = [backend.deliver(f) for f in frames]
        await rig.settle()
        assert rig.rings[0].get_used() == []  # no buffers yet: the frames wait
        rig.add_rx(0, [2048], count=4)  # the kick wakes the starved queue
        got = await rig.receive(0, 3)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert results == [True, True, True, False, False]
    assert [g[12:] for g in got] == frames[:3]
    assert device.stats()["drop_rx_backlog_full"] == 2


async def test_deliver_before_any_queue_runs_is_dropped() -> None:
    backend = ListBackend()
    device = NetDevice(backend)
    assert backend.deliver(b"\0" * 60) is False
    assert device.stats()["drop_rx_not_ready"] == 1


async def test_deliver_from_another_thread() -> None:
    backend = ListBackend()
    device = NetDevice(backend)
    rig = Rig(device, features=MRG)
    frame = eth_frame(MAC_B, MAC_A, b"from a thread")
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [2048])
        await rig.settle()
        result: list[bool] = []
        thread = threading.Thread(target=lambda: result.append(backend.deliver(frame)))
        thread.start()
        [got] = await rig.receive(0)
        thread.join()
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert result == [True]
    assert got[12:] == frame


# --- a backend with a file descriptor: zero-copy receive --------------------------------


@RINGS
@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
async def test_fd_backend_receives_into_guest_buffers(packed: bool, vnet: bool) -> None:
    backend = FdBackend(vnet_hdr=vnet)
    device = NetDevice(backend)
    rig = Rig(device, features=MRG, packed=packed)
    small = eth_frame(MAC_A, MAC_B, b"small")
    large = eth_frame(MAC_A, MAC_B, bytes(range(256)) * 16)  # beyond the MTU-sized reserve
    head = NET_HDR.pack(HdrFlag.DATA_VALID, 0, 0, 0, 0, 0, 0) if vnet else b""
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [1024], count=8)
        backend.peer.send(head + small)
        backend.peer.send(head + large)
        got = await rig.receive(0, 2)
        await rig.stop()
        nursery.cancel_scope.cancel()
    flags = HdrFlag.DATA_VALID if vnet else 0
    assert got[0] == NET_HDR.pack(flags, 0, 0, 0, 0, 0, 1) + small
    assert got[1] == NET_HDR.pack(flags, 0, 0, 0, 0, 0, 5) + large
    assert device.stats()["rx0_bytes"] == len(small) + len(large)
    backend.close()


@RINGS
async def test_fd_backend_oversized_frame_dropped_without_mrg(packed: bool) -> None:
    backend = FdBackend()
    device = NetDevice(backend, mrg_rxbuf=False)
    rig = Rig(device, features=0, packed=packed)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [800])
        backend.peer.send(eth_frame(MAC_A, MAC_B, bytes(1000)))
        backend.peer.send(eth_frame(MAC_A, MAC_B, b"next"))
        [got] = await rig.receive(0)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert got[12:] == eth_frame(MAC_A, MAC_B, b"next")
    assert device.stats()["drop_rx_oversize"] == 1
    backend.close()


async def test_fd_backend_frame_larger_than_ring_is_dropped() -> None:
    backend = FdBackend()
    device = NetDevice(backend)
    rig = Rig(device, features=MRG)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [1600], count=2)  # 3200 bytes in all
        backend.peer.send(eth_frame(MAC_A, MAC_B, bytes(5000)))
        backend.peer.send(eth_frame(MAC_A, MAC_B, b"then this"))
        [got] = await rig.receive(0)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert got[12:] == eth_frame(MAC_A, MAC_B, b"then this")
    assert device.stats()["drop_rx_no_buffers"] == 1
    backend.close()


async def test_fd_backend_transmit_and_vnet_header_passthrough() -> None:
    offloads = int(NetFeature.CSUM | NetFeature.HOST_TSO4 | NetFeature.GUEST_CSUM)
    backend = FdBackend(vnet_hdr=True, offloads=offloads)
    device = NetDevice(backend)
    assert device.features() & offloads == offloads
    rig = Rig(device, features=MRG | NetFeature.CSUM | NetFeature.HOST_TSO4)
    header = NET_HDR.pack(HdrFlag.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, 34, 16, 0)
    frame = eth_frame(MAC_B, MAC_A, bytes(3000), 0x0800)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.send(0, frame, header=header, split=100)
        await rig.wait_used(1, 1)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert backend.peer.recv(10000) == header + frame
    assert backend.features[-1] == rig.features
    backend.close()


# --- transmit side ---------------------------------------------------------------------


@RINGS
async def test_transmit_strips_the_header(packed: bool) -> None:
    backend = ListBackend()
    device = NetDevice(backend)
    rig = Rig(device, features=MRG, packed=packed)
    frames = [eth_frame(MAC_B, MAC_A, bytes([i]) * (60 + i)) for i in range(20)]
    bad_csum = NET_HDR.pack(HdrFlag.NEEDS_CSUM, 0, 0, 0, 14, 6, 0)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        for i, frame in enumerate(frames):
            rig.send(0, frame, split=(i % 3) * 7)
        rig.send(0, frames[0], header=bad_csum)  # an offload we never offered
        rig.send(0, b"", header=b"short")  # shorter than the header
        used = await rig.wait_used(1, len(frames) + 2)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert backend.sent == frames
    assert all(u.written == 0 for u in used)
    stats = device.stats()
    assert stats["tx0_frames"] == len(frames)
    assert stats["drop_tx_offload"] == 1
    assert stats["drop_tx_malformed"] == 1


# --- multiqueue ------------------------------------------------------------------------


async def test_multiqueue_pairs_are_independent_and_flows_spread() -> None:
    backend = ListBackend()
    device = NetDevice(backend, queues=2)
    assert device.num_queues == 4
    assert device.features() & NetFeature.MQ
    assert NET_CONFIG.unpack(device.config())[2] == 2
    rig = Rig(device, features=MRG | NetFeature.MQ)
    flows = [udp4_frame(b"\x0a\0\0\x01", b"\x0a\0\0\x02", 1000 + i, 53) for i in range(32)]
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        for pair in (0, 1):
            rig.add_rx(pair, [2048], count=32)
        for flow in flows:
            assert backend.deliver(flow)
            assert backend.deliver(flow)  # the same flow lands on the same queue
        rig.send(1, flows[0])
        await rig.wait_used(3, 1)
        await rig.settle()
        per_pair = [[b"".join(u.data)[12:] for u in rig.rings[2 * p].get_used()] for p in (0, 1)]
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert sorted(per_pair[0] + per_pair[1]) == sorted(flows * 2)
    assert per_pair[0] and per_pair[1]
    for got in per_pair:
        assert all(got.count(f) in (0, 2) for f in flows)
    stats = device.stats()
    assert stats["rx0_frames"] == len(per_pair[0]) and stats["rx1_frames"] == len(per_pair[1])
    assert stats["tx1_frames"] == 1 and stats["tx0_frames"] == 0
    assert backend.sent == [flows[0]]


def test_flow_hash_ignores_non_ip() -> None:
    assert flow_hash(eth_frame(MAC_A, MAC_B, bytes(50))) == 0
    a = udp4_frame(b"\1\2\3\4", b"\5\6\7\x08", 1, 2)
    b = udp4_frame(b"\1\2\3\4", b"\5\6\7\x08", 1, 3)
    assert flow_hash(a) == flow_hash(a) != flow_hash(b)


# --- negotiation, config space, vhost-user messages -------------------------------------


def test_features_and_config() -> None:
    device = NetDevice(ListBackend(), mac="52:54:00:ab:cd:ef", mtu=9000)
    features = device.features()
    for bit in (NetFeature.MAC, NetFeature.MTU, NetFeature.STATUS, NetFeature.MRG_RXBUF):
        assert features & bit
    assert not features & (NetFeature.MQ | NetFeature.CSUM | NetFeature.GUEST_CSUM)
    assert NET_CONFIG.unpack(device.config()) == (bytes.fromhex("525400abcdef"), 1, 1, 9000)
    assert device.device_id == 1
    assert device.protocol_features == ProtocolFeature.RARP | ProtocolFeature.NET_MTU
    plain = NetDevice(ListBackend(), mrg_rxbuf=False).features()
    assert not plain & (NetFeature.MAC | NetFeature.MTU | NetFeature.MRG_RXBUF)


def test_offloads_need_a_vnet_backend_and_their_prerequisites() -> None:
    all_offloads = int(
        NetFeature.GUEST_TSO4 | NetFeature.GUEST_ECN | NetFeature.HOST_TSO6 | NetFeature.CSUM
    )
    assert not NetDevice(ListBackend(offloads=all_offloads)).features() & all_offloads
    offered = NetDevice(ListBackend(vnet_hdr=True, offloads=all_offloads)).features()
    # GUEST_TSO4 needs GUEST_CSUM (and ECN needs TSO); HOST_TSO6 has its CSUM.
    assert offered & all_offloads == NetFeature.CSUM | NetFeature.HOST_TSO6
    assert consistent_offloads(NetFeature.HOST_ECN | NetFeature.CSUM) == NetFeature.CSUM
    full = NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO6 | NetFeature.GUEST_ECN
    assert consistent_offloads(full) == full


def test_header_length_follows_features() -> None:
    assert vnet_hdr_len(VirtioFeature.VERSION_1) == 12
    assert vnet_hdr_len(NetFeature.MRG_RXBUF) == 12
    assert vnet_hdr_len(0) == 10


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mac": "52:54:00"}, "mac:"),
        ({"mac": "zz:54:00:12:34:56"}, "mac:"),
        ({"mtu": 10}, "mtu:"),
        ({"mtu": "big"}, "mtu:"),
        ({"queues": 0}, "queues:"),
        ({"rx_backlog": -1}, "rx_backlog:"),
    ],
)
def test_bad_device_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NetDevice(ListBackend(), **options)  # type: ignore[arg-type]


def test_parse_mac() -> None:
    assert parse_mac("52-54-00-0a-0b-0c") == bytes.fromhex("5254000a0b0c")
    assert parse_mac(b"\1\2\3\4\5\6") == b"\1\2\3\4\5\6"


async def test_send_rarp_and_set_mtu() -> None:
    backend = ListBackend()
    device = NetDevice(backend, mtu=1500)
    mac = bytes.fromhex("525400123456")
    assert await device.handle_message(Request.SEND_RARP, mac) is None
    [frame] = backend.sent
    assert frame == rarp_announce(mac)
    assert frame[:14] == b"\xff" * 6 + mac + b"\x80\x35"
    assert struct.unpack("!HHBBH6s4s6s4s", frame[14:42]) == (
        1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4)
    )  # fmt: skip
    assert len(frame) == 60
    assert device.stats()["rarp_sent"] == 1
    assert await device.handle_message(Request.NET_SET_MTU, 9000) is None
    assert NET_CONFIG.unpack(device.config())[3] == 9000
    with pytest.raises(Exception, match="NET_SET_MTU"):
        await device.handle_message(Request.NET_SET_MTU, 20)
    with pytest.raises(Exception, match="not supported"):
        await device.handle_message(Request.SET_LOG_BASE, 0)


async def test_rarp_through_a_vnet_backend_carries_a_header() -> None:
    backend = ListBackend(vnet_hdr=True)
    device = NetDevice(backend)
    device.set_features(VirtioFeature.VERSION_1)
    await device.handle_message(Request.SEND_RARP, MAC_A)
    assert backend.sent == [bytes(12) + rarp_announce(MAC_A)]


async def test_stopping_rx_returns_unused_buffers_and_restarts() -> None:
    backend = FdBackend()
    device = NetDevice(backend)
    rig = Rig(device, features=MRG)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [1600], count=1)
        await rig.settle()  # the device took the chain, waiting for a frame
        await rig.stop()
        [returned] = rig.rings[0].get_used()
        assert returned.written == 0
        # Restart the same rings where they stopped: traffic flows again.
        await rig.start(nursery)
        rig.add_rx(0, [1600])
        backend.peer.send(eth_frame(MAC_A, MAC_B, b"again"))
        [got] = await rig.receive(0)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert got[12:] == eth_frame(MAC_A, MAC_B, b"again")
    backend.close()


async def test_frames_beyond_64k_are_dropped_not_truncated() -> None:
    backend = FdBackend()
    device = NetDevice(backend)
    rig = Rig(device, features=MRG, size=128)
    huge = eth_frame(MAC_A, MAC_B, bytes(70000))
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [2048], count=64)  # 128 KiB of buffers: room enough, but too big
        backend.peer.send(huge)
        assert backend.deliver(huge)
        backend.peer.send(eth_frame(MAC_A, MAC_B, b"after"))
        [got] = await rig.receive(0)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert got[12:] == eth_frame(MAC_A, MAC_B, b"after")
    assert device.stats()["drop_rx_oversize"] == 2
    backend.close()


def test_consistent_offloads_keeps_unrelated_bits() -> None:
    other = int(VirtioFeature.VERSION_1 | NetFeature.MRG_RXBUF)
    assert consistent_offloads(other | NetFeature.GUEST_TSO4) == other


def test_options_as_text_from_the_command_line() -> None:
    device = NetDevice(ListBackend(), queues="2", mtu="9000", mrg_rxbuf="off")
    assert (device.num_queues, device.mtu, device.mrg_rxbuf) == (4, 9000, False)
    assert not device.features() & NetFeature.MRG_RXBUF
    with pytest.raises(ValueError, match="mrg_rxbuf:"):
        NetDevice(ListBackend(), mrg_rxbuf="maybe")


# --- size caps and buffer reservation (issue 11, items 6 and 10) ------------------------


async def test_a_512_mib_tx_chain_is_dropped_without_copying_it() -> None:
    device = NetDevice(EchoBackend())
    rig = Rig(device, features=MRG, size=1024, mem_size=4 << 20)
    piece = 512 << 10
    buffer = rig.mem.alloc(piece)
    ok = eth_frame(MAC_B, MAC_A, b"small")
    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            await rig.start(nursery)
            rig.add_rx(0, [2048], count=4)
            rig.send_aliased(0, buffer, piece, 1024)  # 512 MiB in one frame
            await rig.wait_used(1, 1)
            rig.send(0, ok)
            await rig.wait_used(1, 1)
            [echo] = await rig.receive(0)
            await rig.stop()
            nursery.cancel_scope.cancel()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # nothing near the frame's size was allocated
    assert echo[12:] == swapped(ok)
    stats = device.stats()
    assert stats["drop_tx_oversize"] == 1 and stats["tx0_frames"] == 1


@pytest.mark.parametrize(
    ("features", "mtu", "allowed"),
    [
        (NetFeature.MTU, 1500, 1500 + 18),  # the MTU the driver agreed to keep
        (NetFeature.MTU | NetFeature.CSUM | NetFeature.HOST_TSO4, 1500, 65535 + 18),  # GSO
        (0, 1500, 65535 + 18),  # no MTU promised: any frame up to 64 KiB
    ],
    ids=["mtu", "mtu-gso", "no-mtu"],
)
async def test_tx_frames_are_capped_by_the_features(features: int, mtu: int, allowed: int) -> None:
    backend = ListBackend(vnet_hdr=True, offloads=int(NetFeature.CSUM | NetFeature.HOST_TSO4))
    device = NetDevice(backend, mtu=mtu)
    rig = Rig(device, features=MRG | features, size=256)
    fits = eth_frame(MAC_B, MAC_A, bytes(allowed - 14))
    too_big = fits + b"!"
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.send(0, fits, split=1000)
        rig.send(0, too_big, split=1000)
        await rig.wait_used(1, 2)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert [len(f) - 12 for f in backend.sent] == [allowed]
    assert device.stats()["drop_tx_oversize"] == 1


GSO = NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO4


async def test_gso_frames_wait_for_buffers_instead_of_being_dropped() -> None:
    """A frame is taken from the fd only once 64 KiB of buffers are pooled."""
    backend = FdBackend(vnet_hdr=True, offloads=int(GSO))
    device = NetDevice(backend)
    rig = Rig(device, features=MRG | GSO, size=256)
    header = NET_HDR.pack(HdrFlag.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, 34, 16, 0)
    frames = [eth_frame(MAC_A, MAC_B, bytes([i]) * 60000, 0x0800) for i in range(3)]
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [1536], count=10)  # 15 KiB: room for none of them
        for frame in frames:
            backend.peer.send(header + frame)
        await rig.settle()
        assert rig.rings[0].get_used() == []  # still in the fd, not dropped
        got = []
        for _ in range(6):  # the driver posts more, a few at a time
            rig.add_rx(0, [1536], count=40)
            await rig.settle()
            while rig.rings[0].has_used() and len(got) < 3:
                got += await rig.receive(0)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert [g[12:] for g in got] == frames
    assert all(hdr_fields(g)[:2] == (HdrFlag.NEEDS_CSUM, GsoType.TCPV4) for g in got)
    assert not any(k.startswith("drop_") for k in device.stats())
    backend.close()


async def test_a_ring_smaller_than_the_reserve_still_receives() -> None:
    backend = FdBackend(vnet_hdr=True, offloads=int(GSO))
    device = NetDevice(backend)
    rig = Rig(device, features=MRG | GSO, size=16)
    frame = eth_frame(MAC_A, MAC_B, b"small ring")
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [1536], count=16)  # the whole ring: 24 KiB, less than 64 KiB
        backend.peer.send(bytes(12) + frame)
        [got] = await rig.receive(0)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert got[12:] == frame
    backend.close()
