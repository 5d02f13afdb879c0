"""virtio-net with its backend in a driver domain: frames both ways, a namespace, a crash."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from domain_helpers import kill_child, wait_until
from pyroute2 import IPRoute

from vdev import netsetup
from vdev.config import DeviceSpec, build_device
from vdev.devices.net import NetDevice, format_mac
from vdev.domain.host import DomainHost
from vdev.domain.proxy import NetProxy
from vdev.domain.spec import DomainSpec
from vdev.testing.frontend import Frontend, FrontendQueue, serve_device

MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")
HDR = bytes(12)


def frame(payload: bytes) -> bytes:
    return MAC_B + MAC_A + b"\x88\xb5" + payload


def echoed(sent: bytes) -> bytes:
    return sent[6:12] + sent[0:6] + sent[12:]


def net_in_domain(socket: Path, backend: str, **domain: object) -> tuple[NetDevice, DomainHost]:
    spec = DeviceSpec("net", socket, backend, {}, domain=DomainSpec("driver", **domain))  # type: ignore[arg-type]
    device = build_device(spec)
    assert isinstance(device, NetDevice) and isinstance(device.backend, NetProxy)
    return device, device.backend.host


async def echo_round(rx: FrontendQueue, tx: FrontendQueue, frames: list[bytes]) -> list[bytes]:
    """Post receive buffers, send `frames`, return what came back (headers stripped)."""
    for _ in frames:
        rx.add([], [16384])
    rx.kick()
    for f in frames:
        tx.add([HDR + f], [])
    tx.kick()
    with trio.fail_after(20):
        await tx.wait_used(len(frames))
        used = await rx.wait_used(len(frames))
    return [b"".join(u.data)[12:] for u in used]


async def test_echo_through_a_driver_domain(tmp_path: Path) -> None:
    device, host = net_in_domain(tmp_path / "n.sock", "echo")
    frames = [frame(bytes([i]) * (40 + 150 * i)) for i in range(10)] + [frame(bytes(9000))]
    async with serve_device(device, tmp_path / "n.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        rx, tx = await fe.setup_queue(0), await fe.setup_queue(1)
        got = await echo_round(rx, tx, frames)
    assert got == [echoed(f) for f in frames]
    stats = device.stats()
    assert stats["tx_frames"] == stats["rx_frames"] == len(frames)
    assert host.failure is None
    device.close()


async def test_net_child_restarts_and_traffic_resumes(tmp_path: Path) -> None:
    device, host = net_in_domain(tmp_path / "r.sock", "echo")
    async with serve_device(device, tmp_path / "r.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        rx, tx = await fe.setup_queue(0), await fe.setup_queue(1)
        before = await echo_round(rx, tx, [frame(b"before")])
        kill_child(host)
        await wait_until(lambda: host.restarts == 1 and host.pid)
        after = await echo_round(rx, tx, [frame(b"after %d" % i) for i in range(5)])
    assert before == [echoed(frame(b"before"))]
    assert after == [echoed(frame(b"after %d" % i)) for i in range(5)]
    device.close()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"vdev-t-{uuid.uuid4().hex[:8]}"
    netsetup.create_netns(name)
    try:
        yield name
    finally:
        netsetup.remove_netns(name)


async def test_net_child_lives_in_its_namespace(tmp_path: Path, netns: str) -> None:
    device, host = net_in_domain(tmp_path / "ns.sock", "echo", netns=netns)
    async with serve_device(device, tmp_path / "ns.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        rx, tx = await fe.setup_queue(0), await fe.setup_queue(1)
        got = await echo_round(rx, tx, [frame(b"in a namespace")])
        assert host.pid is not None
        child_ns = os.stat(f"/proc/{host.pid}/ns/net").st_ino
    assert got == [echoed(frame(b"in a namespace"))]
    assert child_ns == os.stat(netsetup.NETNS_DIR / netns).st_ino
    assert child_ns != os.stat("/proc/self/ns/net").st_ino
    device.close()


async def test_a_multiqueue_tap_in_a_child_is_read_on_every_queue(
    tmp_path: Path, netns: str
) -> None:
    """The child reads each of its TAP's queue fds (the kernel spreads flows over them);
    every frame reaches the core's receive queue."""
    tap, host_ip, guest_ip = f"vdq{uuid.uuid4().hex[:8]}", "10.78.0.1", "10.78.0.2"
    options = {"tap": tap, "queues": 2, "address": f"{host_ip}/24"}
    domain = DomainSpec("driver", netns=netns)
    device = build_device(DeviceSpec("net", tmp_path / "mq.sock", "tap", options, domain=domain))  # type: ignore[arg-type]
    assert isinstance(device, NetDevice) and device.num_queue_pairs == 2

    def send_flows(ipr: IPRoute) -> None:
        index = netsetup.link_index(ipr, tap)
        ipr.neigh("add", dst=guest_ip, lladdr=format_mac(MAC_A), ifindex=index, state=0x80)
        for _ in range(48):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"flow", (guest_ip, 9999))

    async with serve_device(device, tmp_path / "mq.sock") as path, Frontend.connect(path) as fe:
        await fe.negotiate()
        rx = await fe.setup_queue(0, size=128)
        await fe.setup_queue(1)
        for _ in range(100):
            rx.add([], [2048])
        rx.kick()
        await trio.to_thread.run_sync(netsetup.with_iproute, netns, send_flows)
        used = await rx.wait_used(48)
    udp = [u for u in used if b"".join(u.data)[12 + 12 : 12 + 14] == b"\x08\x00"]
    assert len(udp) >= 48
    device.close()
