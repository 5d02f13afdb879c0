"""virtio-net served by vdev to real Linux guests under QEMU.

QEMU attaches the NIC from the qemu-configs templates (`render_args`); the guests run
busybox scripts (ip, ping, nc). Host-side traffic stays inside network namespaces the
tests create (10.66-10.68.x addresses), never on the host's own interfaces. These tests
skip only when qemu-system-x86_64 is absent, the TAP ones also when not root.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from vdev_backends.net_responder import ResponderBackend

from vdev import netsetup
from vdev.devices.net import NetDevice
from vdev.qemu import render_args
from vdev.server import DeviceServer
from vdev.testing.guest import GuestResult
from vdev.testing.pytest_plugin import DaemonFactory, GuestRunner

pytestmark = pytest.mark.requires_qemu

MiB = 1 << 20
TRANSFER = 8 * MiB
_ids = itertools.count()
_SHA = re.compile(r"^(sent|got) ([0-9a-f]{64})", re.MULTILINE)

# A receiver for `nc -l -e`: the script's stdin is /dev/null, and busybox nc stops
# reading the network once its own stdin ends, so the data must go through -e.
RX_HELPER = """printf '#!/bin/sh\\ncat > /tmp/in\\n' > /tmp/rx.sh && chmod +x /tmp/rx.sh"""


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100_000}x{next(_ids)}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nic_args(sock: Path, *, queues: int = 1, name: str = "net0") -> list[str]:
    return render_args("vdev-net", id=name, socket=sock, queues=queues, mq=queues > 1)


def configure(mac: str, ip: str, peer: str) -> str:
    """Guest commands: give eth0 `mac` and `ip`/24, then wait until `peer` answers pings."""
    return f"""
        ip link set eth0 address {mac}
        ip addr add {ip}/24 dev eth0
        ip link set eth0 up
        n=0
        until ping -c 1 -W 1 {peer} > /dev/null 2>&1; do
            n=$((n + 1)); [ $n -lt 60 ] || {{ echo "no answer from {peer}"; exit 1; }}
        done
    """


def checksums(result: GuestResult) -> dict[str, str]:
    """The "sent <sha256>" / "got <sha256>" lines of a guest's output."""
    assert result.exit_code == 0, result.output
    return dict(_SHA.findall(result.output))


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"vdevnet-{os.getpid()}-{next(_ids)}"
    netsetup.create_netns(name)
    try:
        yield name
    finally:
        netsetup.remove_netns(name)


def ns_socket(ns: str, port: int | None = None) -> trio.socket.SocketType:
    """A TCP socket of namespace `ns` (listening on `port` if given)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if port is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(1)
        return sock

    return trio.socket.from_stdlib_socket(netsetup.in_netns(ns, make))


async def receive_all(listener: trio.socket.SocketType) -> bytes:
    conn, _ = await listener.accept()
    data = bytearray()
    with conn:
        while chunk := await conn.recv(1 << 16):
            data += chunk
    return bytes(data)


async def send_to(ns: str, address: str, port: int, data: bytes) -> None:
    """Connect from namespace `ns` (retrying while refused), send `data`, close."""
    for _ in range(50):
        sock = ns_socket(ns)
        with sock:
            try:
                await sock.connect((address, port))
            except ConnectionRefusedError:
                await trio.sleep(0.2)
                continue
            view = memoryview(data)
            while view:
                view = view[await sock.send(view) :]
            return
    raise AssertionError(f"{address}:{port} refused every connection")


@pytest.mark.requires_root
async def test_tap_guest_and_host_namespace_ping_and_transfer(
    netns: str, vdev_daemon: DaemonFactory, vdev_guest: GuestRunner
) -> None:
    host_ip, guest_ip = "10.66.0.1", "10.66.0.2"
    to_guest = random.Random(1).randbytes(TRANSFER)
    listener = ns_socket(netns, 7001)
    script = f"""
        set -e
        {configure("52:54:00:66:00:02", guest_ip, host_ip)}
        ping -c 3 {host_ip}
        echo "@pinged"
        dd if=/dev/urandom of=/tmp/out bs=1M count={TRANSFER // MiB} 2> /dev/null
        echo "sent $(sha256sum /tmp/out)"
        nc {host_ip} 7001 < /tmp/out
        {RX_HELPER}
        echo "@listening"
        nc -l -p 7002 -e /tmp/rx.sh
        echo "got $(sha256sum /tmp/in)"
    """
    args = ["net", "--backend", "tap", "--tap", unique("vdt")]
    args += ["--netns", netns, "-o", f"address={host_ip}/24"]
    daemon = await vdev_daemon(*args)
    async with vdev_guest.start(script, qemu_args=nic_args(daemon.socket)) as guest:
        with trio.fail_after(240), listener:
            await guest.wait_for("@pinged")
            ping = await trio.run_process(
                ["ip", "netns", "exec", netns, "busybox", "ping", "-c", "3", "-W", "5", guest_ip],
                capture_stdout=True,
                check=False,
            )
            from_guest = await receive_all(listener)
            await guest.wait_for("@listening")
            await send_to(netns, guest_ip, 7002, to_guest)
            result = await guest.wait()
    assert await daemon.stop() == 0 and not daemon.socket.exists()
    sums = checksums(result)
    assert "3 packets received" in result.output  # the guest pinged the host
    assert ping.returncode == 0, ping.stdout  # and the host the guest
    assert b"3 packets received" in ping.stdout
    assert sums == {"sent": sha256(from_guest), "got": sha256(to_guest)}
    assert len(from_guest) == TRANSFER


async def test_two_guests_on_a_switch(
    tmp_path: Path, vdev_daemon: DaemonFactory, vdev_guest: GuestRunner
) -> None:
    """One `vdev run --config` daemon serves both NICs, ports of the same switch."""
    socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
    config = tmp_path / "switch.toml"
    switch = unique("sw")
    config.write_text(
        "".join(
            f'[[device]]\ntype = "net"\nsocket = "{s}"\nbackend = "switch"\nswitch = "{switch}"\n\n'
            for s in socks
        )
    )
    ips = ["10.67.0.1", "10.67.0.2"]
    receiver = f"""
        set -e
        {configure("52:54:00:67:00:01", ips[0], ips[1])}
        ping -c 3 {ips[1]}
        {RX_HELPER}
        nc -l -p 7003 -e /tmp/rx.sh
        echo "got $(sha256sum /tmp/in)"
    """
    sender = f"""
        set -e
        {configure("52:54:00:67:00:02", ips[1], ips[0])}
        ping -c 3 {ips[0]}
        dd if=/dev/urandom of=/tmp/out bs=1M count={TRANSFER // MiB} 2> /dev/null
        echo "sent $(sha256sum /tmp/out)"
        n=0
        until nc {ips[0]} 7003 < /tmp/out; do
            n=$((n + 1)); [ $n -lt 60 ] || exit 1; sleep 1
        done
    """
    results: dict[str, GuestResult] = {}

    async def boot(name: str, script: str, sock: Path) -> None:
        results[name] = await vdev_guest(script, qemu_args=nic_args(sock), mem="256M", timeout=300)

    daemon = await vdev_daemon("--config", str(config))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(boot, "receiver", receiver, socks[0])
        nursery.start_soon(boot, "sender", sender, socks[1])
    assert await daemon.stop() == 0 and not any(s.exists() for s in socks)
    for result in results.values():
        assert "3 packets received" in result.output  # each pinged the other
    assert checksums(results["receiver"])["got"] == checksums(results["sender"])["sent"]


async def test_two_queue_pairs_both_carry_traffic(tmp_path: Path, vdev_guest: GuestRunner) -> None:
    """A 2-vCPU guest on a 2-pair NIC: each CPU transmits on its own queue (XPS), and the
    responder's replies spread over both receive queues by flow hash."""
    device = NetDevice(ResponderBackend(address="10.68.0.1/24"), queues=2)
    sock = tmp_path / "nic.sock"
    script = f"""
        set -e
        {configure("52:54:00:68:00:02", "10.68.0.2", "10.68.0.1")}
        ls /sys/class/net/eth0/queues
        taskset 1 ping -A -q -c 100 10.68.0.1
        taskset 2 ping -A -q -c 100 10.68.0.1
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(DeviceServer(device, sock).serve)
        result = await vdev_guest(script, qemu_args=nic_args(sock, queues=2), cpus=2)
        nursery.cancel_scope.cancel()
    device.close()
    assert result.exit_code == 0, result.output
    assert set(result.output.split()) >= {"rx-0", "rx-1", "tx-0", "tx-1"}
    assert result.output.count("100 packets received") == 2
    stats = device.stats()
    for counter in ("tx0_frames", "tx1_frames", "rx0_frames", "rx1_frames"):
        assert stats[counter] >= 20, stats
    assert stats["rx_frames"] >= 200  # every echo reply (and the ARP answers) arrived
