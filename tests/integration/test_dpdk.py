"""Interop with a front-end other than QEMU: DPDK's virtio-user port in dpdk-testpmd.

vdev serves an echo NIC in this process; testpmd connects to its socket as the
vhost-user front-end, sends frames and receives the echoes. The tests skip only when
dpdk-testpmd is not installed (scripts/setup.sh installs it).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from vdev_backends.net_echo import EchoBackend

from vdev.bench import net as bench_net
from vdev.bench.net import PortStats, run_testpmd, virtio_user
from vdev.devices.net import NetDevice
from vdev.server import DeviceServer

pytestmark = pytest.mark.requires_testpmd

#: testpmd's own MAC for the port it sends from in txonly mode (its default peer).
PEER_MAC = "02:00:00:00:00:00"
_VERBOSE_RX = re.compile(r"src=([0-9A-F:]{17}) - dst=([0-9A-F:]{17}).*?length=(\d+)")


@asynccontextmanager
async def echo_nic(tmp_path: Path, queues: int = 1) -> AsyncIterator[tuple[NetDevice, Path]]:
    device = NetDevice(EchoBackend(), queues=queues)
    sock = tmp_path / "net.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(DeviceServer(device, sock).serve)
        yield device, sock
        nursery.cancel_scope.cancel()
    device.close()


def pmd_argv(sock: Path, *, queues: int = 1, packed: bool = False, **kwargs: object) -> list[str]:
    return bench_net.testpmd_argv(
        virtio_user(sock, queues=queues, packed=packed),
        prefix=f"vdevtest-{os.getpid()}",
        lcores="0,1",
        queues=queues,
        **kwargs,  # type: ignore[arg-type]
    )


async def forward_until(pmd: bench_net.Testpmd, frames: int, timeout: float = 60) -> PortStats:
    """Let testpmd forward until it has received `frames` echoes, then stop it."""
    with trio.fail_after(timeout):
        while (await pmd.port_stats()).rx_packets < frames:
            await trio.sleep(0.2)
    await pmd.command("stop")
    await trio.sleep(0.5)  # vdev takes what testpmd sent last
    return await pmd.port_stats()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_testpmd_frames_go_round_trip_through_echo(tmp_path: Path, packed: bool) -> None:
    async with echo_nic(tmp_path) as (device, sock):
        async with run_testpmd(pmd_argv(sock, packed=packed, forward_mode="io")) as pmd:
            await pmd.command("start tx_first 4")  # 128 frames bounce back and forth
            stats = await forward_until(pmd, 5000)
        vdev = device.stats()
    # Every frame testpmd sent reached the echo port, and testpmd got echoes back.
    assert vdev["tx0_frames"] == stats.tx_packets
    assert vdev["tx0_bytes"] == stats.tx_bytes == 64 * stats.tx_packets
    assert 5000 <= stats.rx_packets <= vdev["rx0_frames"] <= vdev["tx0_frames"]
    assert stats.rx_bytes == 64 * stats.rx_packets
    assert not any(k.startswith("drop_") for k in vdev), vdev


async def test_echoed_frames_come_back_whole_with_macs_swapped(tmp_path: Path) -> None:
    async with echo_nic(tmp_path) as (device, sock):
        argv = pmd_argv(sock, forward_mode="rxonly", frame_size=1500)
        async with run_testpmd(argv) as pmd:
            port_mac = re.search(r"Port 0: ([0-9A-F:]{17})", pmd.tail(100_000))
            assert port_mac is not None, pmd.tail()
            await pmd.command("set verbose 1")
            await pmd.send("start tx_first")  # one burst of 32 frames, then receive
            stats = await forward_until(pmd, 32)
            received = _VERBOSE_RX.findall(pmd.tail(100_000))
    assert stats.rx_packets == stats.tx_packets == 32
    # The forwarding core's verbose lines may interleave with the prompt and lose a
    # few to garbling; the port counters above count every frame.
    assert 0 < len(received) <= 32
    # testpmd sent from its port's MAC to its peer's; the echo swapped them.
    assert set(received) == {(PEER_MAC, port_mac.group(1), "1500")}
    assert device.stats()["rx0_bytes"] == 32 * 1500


async def test_testpmd_uses_both_queue_pairs(tmp_path: Path) -> None:
    async with echo_nic(tmp_path, queues=2) as (device, sock):
        # Many flows: the echo port's frames spread over both receive queues by flow hash.
        argv = pmd_argv(sock, queues=2, forward_mode="io", extra=["--txonly-multi-flow"])
        async with run_testpmd(argv) as pmd:
            await pmd.command("start tx_first 2")
            stats = await forward_until(pmd, 5000)
    vdev = device.stats()
    assert vdev["tx_frames"] == stats.tx_packets
    assert stats.rx_packets <= vdev["rx_frames"]
    for counter in ("tx0_frames", "tx1_frames", "rx0_frames", "rx1_frames"):
        assert vdev[counter] > 100, vdev
