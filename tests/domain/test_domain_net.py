"""virtio-net with its backend in a driver domain: frames both ways, a namespace, a crash."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from domain_helpers import kill_child, wait_until

from vdev import netsetup
from vdev.config import DeviceSpec, build_device
from vdev.devices.net import NetDevice
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
