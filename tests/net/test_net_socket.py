"""NetDevice behind the real server, driven by vdev's Python front-end over a socket."""

from __future__ import annotations

import os
from pathlib import Path

import trio
from net_helpers import MAC_A, MAC_B, ListBackend, eth_frame, hdr_fields
from vdev_backends.net_echo import EchoBackend

from vdev.devices.net import NET_CONFIG, NetDevice, NetFeature, rarp_announce
from vdev.protocol import (
    F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
    VringAddress,
    VringFile,
    VringState,
)
from vdev.testing.driver_rings import DriverPackedRing
from vdev.testing.frontend import Frontend, FrontendQueue, serve_device
from vdev.testing.pytest_plugin import FrontendFactory
from vdev.virtio.features import TRANSPORT_FEATURES, VirtioFeature


async def echo_round(rx: FrontendQueue, tx: FrontendQueue, frames: list[bytes]) -> list[bytes]:
    """Post receive buffers, send `frames`, return what came back (headers stripped)."""
    for _ in frames:
        rx.add([], [2048])
    rx.kick()
    for frame in frames:
        tx.add([bytes(12) + frame], [])
    tx.kick()
    await tx.wait_used(len(frames))
    used = await rx.wait_used(len(frames))
    for u in used:
        assert hdr_fields(b"".join(u.data))[6] == 1  # num_buffers
    return [b"".join(u.data)[12:] for u in used]


async def test_echo_over_vhost_user(vdev_frontend: FrontendFactory, vdev_ring_layout: str) -> None:
    packed = vdev_ring_layout == "packed"
    device = NetDevice(EchoBackend(), mac="52:54:00:00:00:01", mtu=1500)
    frames = [eth_frame(MAC_B, MAC_A, bytes([i]) * (50 + 97 * i)) for i in range(10)]
    fe = await vdev_frontend(device, packed=packed)
    assert fe.features & NetFeature.MRG_RXBUF and fe.features & NetFeature.MTU
    assert bool(fe.features & VirtioFeature.RING_PACKED) == packed
    config = device.config()[: NET_CONFIG.size]
    assert NET_CONFIG.unpack(config) == (MAC_A, 1, 1, 1500)
    rx, tx = await fe.setup_queue(0), await fe.setup_queue(1)
    got = await echo_round(rx, tx, frames)
    assert got == [f[6:12] + f[0:6] + f[12:] for f in frames]


async def test_rarp_and_mtu_messages(vdev_frontend: FrontendFactory) -> None:
    backend = ListBackend()
    device = NetDevice(backend)
    fe = await vdev_frontend(device)
    assert fe.protocol_features & ProtocolFeature.RARP
    assert fe.protocol_features & ProtocolFeature.NET_MTU
    await fe.send(Request.SEND_RARP, MAC_B, need_reply=True)
    await fe.send(Request.NET_SET_MTU, 4000, need_reply=True)
    config = device.config()[: NET_CONFIG.size]
    assert backend.sent == [rarp_announce(MAC_B)]
    assert NET_CONFIG.unpack(config)[3] == 4000


async def test_multiqueue_over_vhost_user(vdev_frontend: FrontendFactory) -> None:
    device = NetDevice(EchoBackend(), queues=2)
    fe = await vdev_frontend(device)
    assert (await fe.send(Request.GET_QUEUE_NUM)).payload == 4  # type: ignore[union-attr]
    queues = [await fe.setup_queue(i) for i in range(4)]
    frame = eth_frame(MAC_B, MAC_A, b"pair 1")
    queues[0].add([], [2048])
    queues[2].add([], [2048])
    queues[0].kick()
    queues[2].kick()
    queues[3].add([bytes(12) + frame], [])
    queues[3].kick()
    await queues[3].wait_used(1)
    [echo] = await queues[2].wait_used(1)  # an echo stays on the pair that sent it
    assert b"".join(echo.data)[12:] == MAC_A + MAC_B + frame[12:]
    stats = device.stats()
    assert stats["tx1_frames"] == 1 and stats["rx1_frames"] == 1 and stats["rx0_frames"] == 0


async def setup_queue_without_enable(fe: Frontend, index: int, size: int) -> FrontendQueue:
    """Ring setup as a front-end without protocol features does it (no SET_VRING_ENABLE).

    A request with a reply before each one that carries fds keeps it from reaching the
    server glued to earlier messages in one read: the server then charges the fds to
    the first message of the read (a server bug, reported).
    """
    ring = DriverPackedRing(fe.memory, size, features=fe.features & TRANSPORT_FEATURES)
    kick_fd, call_fd = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2))
    await fe.send(Request.SET_VRING_NUM, VringState(index, size))
    addr = VringAddress(index, 0, ring.desc_addr, ring.used_addr, ring.avail_addr, 0)
    await fe.send(Request.SET_VRING_ADDR, addr)
    await fe.send(Request.SET_VRING_BASE, VringState(index, ring.base))
    await fe.send(Request.GET_FEATURES)
    await fe.send(Request.SET_VRING_CALL, VringFile(index, True), [call_fd])
    await fe.send(Request.GET_FEATURES)
    await fe.send(Request.SET_VRING_KICK, VringFile(index, True), [kick_fd])
    queue = FrontendQueue(index, ring, kick_fd, call_fd)
    fe.queues[index] = queue
    return queue


async def test_dpdk_like_session(tmp_path: Path) -> None:
    """No protocol features (so no SET_VRING_ENABLE), packed rings, no MRG_RXBUF."""
    device = NetDevice(EchoBackend())
    frames = [eth_frame(MAC_B, MAC_A, b"dpdk %d" % i) for i in range(5)]
    async with serve_device(device, tmp_path / "net.sock") as path, Frontend.connect(path) as fe:
        await fe.send(Request.SET_OWNER)
        offered = (await fe.send(Request.GET_FEATURES)).payload  # type: ignore[union-attr]
        assert isinstance(offered, int) and offered & VirtioFeature.RING_PACKED
        fe.features = offered & ~(F_PROTOCOL_FEATURES | int(NetFeature.MRG_RXBUF))
        await fe.send(Request.SET_FEATURES, fe.features)
        await fe.send(Request.GET_FEATURES)  # see setup_queue_without_enable
        await fe.set_mem_table()
        rx = await setup_queue_without_enable(fe, 0, 32)
        tx = await setup_queue_without_enable(fe, 1, 32)
        got = await echo_round(rx, tx, frames)
        base = await fe.stop_queue(0)  # packed: avail position low, used position high
        assert base & 0xFFFF == base >> 16 == 0x8005  # all 5 buffers used, none held
    assert got == [f[6:12] + f[0:6] + f[12:] for f in frames]


async def test_guest_buffers_too_small_over_socket(vdev_frontend: FrontendFactory) -> None:
    device = NetDevice(EchoBackend(), mrg_rxbuf=False)
    fe = await vdev_frontend(device)
    rx, tx = await fe.setup_queue(0), await fe.setup_queue(1)
    rx.add([], [128])
    rx.kick()
    tx.add([bytes(12) + eth_frame(MAC_B, MAC_A, bytes(500))], [])
    tx.kick()
    await tx.wait_used(1)
    with trio.fail_after(5):
        while not device.stats().get("drop_rx_oversize"):
            await trio.sleep(0.01)
    assert rx.ring.get_used() == []  # dropped, not truncated into the buffer
    assert device.stats()["drop_rx_oversize"] == 1
