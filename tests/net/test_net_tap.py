"""TapBackend against the real kernel, inside network namespaces the tests create."""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest
import trio
from net_helpers import MAC_A, Rig, arp_request, hdr_fields, icmp_echo, naive_checksum
from pyroute2 import IPRoute
from vdev_backends.net_tap import TapBackend

from vdev import netsetup
from vdev.backend import BackendError
from vdev.devices.base import DeviceError
from vdev.devices.net import HdrFlag, NetDevice, NetFeature
from vdev.protocol import Request

pytestmark = pytest.mark.requires_root

_ids = itertools.count()
HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"vdevtest-{os.getpid()}-{next(_ids)}"
    netsetup.create_netns(name)
    try:
        yield name
    finally:
        netsetup.remove_netns(name)


def unique_tap() -> str:
    return f"vdt{os.getpid() % 100000}x{next(_ids)}"


def link(ns: str | None, name: str) -> dict[str, object] | None:
    """Some attributes of link `name` in `ns`, None if it does not exist."""

    def look(ipr: IPRoute) -> dict[str, object] | None:
        index = netsetup.link_index(ipr, name)
        if index is None:
            return None
        msg = ipr.get_links(index)[0]
        master = msg.get_attr("IFLA_MASTER")
        addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)]
        return {
            "up": bool(msg["flags"] & 1),
            "mtu": msg.get_attr("IFLA_MTU"),
            "master": ipr.get_links(master)[0].get_attr("IFLA_IFNAME") if master else None,
            "addresses": addrs,
        }

    return netsetup.with_iproute(ns, look)


def test_tap_is_created_in_the_netns_and_removed_at_close(ns: str) -> None:
    tap = unique_tap()
    backend = TapBackend(tap=tap, netns=ns, mtu="1400", address=f"{HOST_IP}/24")
    assert link(None, tap) is None  # not in our own namespace
    attrs = link(ns, tap)
    assert attrs is not None and (attrs["up"], attrs["mtu"], attrs["master"]) == (True, 1400, None)
    assert HOST_IP in attrs["addresses"]  # type: ignore[operator]
    assert backend.fileno() >= 0
    backend.close()
    assert link(ns, tap) is None


def test_tap_joins_a_bridge_it_creates(ns: str) -> None:
    tap, bridge = unique_tap(), unique_tap()
    backend = TapBackend(tap=tap, bridge=bridge, netns=ns)
    assert link(ns, tap)["master"] == bridge  # type: ignore[index]
    assert link(ns, bridge)["up"]  # type: ignore[index]
    backend.close()
    assert link(ns, tap) is None and link(ns, bridge) is None


def test_existing_tap_is_used_and_kept(ns: str) -> None:
    tap = unique_tap()
    netsetup.with_iproute(ns, lambda ipr: netsetup.create_tap(ipr, tap))
    backend = TapBackend(tap=tap, netns=ns)
    with pytest.raises(BackendError, match="in use"):
        TapBackend(tap=tap, netns=ns)
    backend.close()
    assert link(ns, tap) is not None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tap": "a/b"}, "tap:"),
        ({"tap": "x" * 16}, "tap:"),
        ({"tap": "vdtnons", "netns": "vdev-no-such-netns"}, "netns:"),
        ({"tap": "vdtx", "mtu": "huge"}, "mtu:"),
        ({"tap": "vdtx", "mtu": 20}, "mtu:"),
        ({"tap": "vdtx", "address": "10.1"}, "address:"),
        ({"tap": "vdtx", "bridge": ""}, "bridge:"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(BackendError, match=message):
        TapBackend(**options)  # type: ignore[arg-type]


def test_a_name_that_is_not_a_tap(ns: str) -> None:
    with pytest.raises(BackendError, match="not a TAP"):
        TapBackend(tap="lo", netns=ns)


async def next_frame(rig: Rig, wanted: Callable[[bytes], bool]) -> bytes:
    """The next received frame (header included) that `wanted` accepts; others (IPv6
    router solicitations and the like from the kernel) are skipped."""
    while True:
        [frame] = await rig.receive(0)
        if wanted(frame[12:]):
            return frame


async def test_guest_talks_to_the_kernel_through_the_tap(ns: str) -> None:
    backend = TapBackend(tap=unique_tap(), netns=ns, address=f"{HOST_IP}/24")
    device = NetDevice(backend, mac=MAC_A)
    rig = Rig(device, features=NetFeature.MRG_RXBUF)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [1536], count=32)
        rig.send(0, arp_request(MAC_A, GUEST_IP, HOST_IP))
        arp = await next_frame(rig, lambda f: f[12:14] == b"\x08\x06")
        host_mac = arp[12 + 6 : 12 + 12]
        rig.send(0, icmp_echo(host_mac, GUEST_IP, HOST_IP, b"through the tap" * 4))
        pong = await next_frame(rig, lambda f: f[12:14] == b"\x08\x00" and f[23] == 1)
        await rig.stop()
        nursery.cancel_scope.cancel()
    backend.close()
    arp_op, sha, spa = struct.unpack_from("!6xH6s4s", arp, 12 + 14)
    assert (arp_op, sha, spa) == (2, host_mac, ipaddress.ip_address(HOST_IP).packed)
    ip = pong[12 + 14 :]
    assert naive_checksum(ip[:20]) == 0 and naive_checksum(ip[20:]) == 0
    assert ip[20] == 0 and ip[28:] == b"through the tap" * 4  # echo reply, same payload
    stats = device.stats()
    assert stats["tx0_frames"] == 2 and stats["rx0_frames"] >= 2


@pytest.mark.parametrize("guest_csum", [False, True], ids=["no-offload", "csum-offload"])
async def test_offloads_follow_the_negotiated_features(ns: str, guest_csum: bool) -> None:
    tap = unique_tap()
    backend = TapBackend(tap=tap, netns=ns, address=f"{HOST_IP}/24")
    device = NetDevice(backend, mac=MAC_A)
    assert device.features() & NetFeature.GUEST_CSUM
    features = NetFeature.MRG_RXBUF | (NetFeature.GUEST_CSUM if guest_csum else 0)
    rig = Rig(device, features=features)

    def send_udp(ipr: IPRoute) -> None:
        add_guest_neighbour(ipr, tap)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"datagram" * 8, (GUEST_IP, 9999))

    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [1536], count=32)
        await trio.to_thread.run_sync(netsetup.with_iproute, ns, send_udp)
        frame = await next_frame(rig, lambda f: f[12:14] == b"\x08\x00" and f[23] == 17)
        await rig.stop()
        nursery.cancel_scope.cancel()
    backend.close()
    flags, gso, _, _, csum_start, csum_offset, num_buffers = hdr_fields(frame)
    assert (gso, num_buffers) == (0, 1)
    assert frame[12 + 42 :] == b"datagram" * 8
    if guest_csum:  # checksum left to the guest: partial, at the UDP header
        assert flags == HdrFlag.NEEDS_CSUM
        assert (csum_start, csum_offset) == (34, 6)
    else:
        assert flags == 0
        assert frame[12 + 40 : 12 + 42] != b"\0\0"  # a real UDP checksum was computed


def test_tap_frames_without_a_device(ns: str) -> None:
    """The backend contract on its own: writev out, readv in, with a 12-byte header."""
    backend = TapBackend(tap=unique_tap(), netns=ns, address=f"{HOST_IP}/24")
    backend.set_features(int(NetFeature.MRG_RXBUF))
    request = arp_request(MAC_A, GUEST_IP, HOST_IP)
    assert backend.transmit([[memoryview(bytes(12)), memoryview(request)]]) == 0
    buf = bytearray(2048)
    for _ in range(200):
        try:
            n = backend.receive_into([memoryview(buf)])
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if buf[12 + 12 : 12 + 14] == b"\x08\x06":
            break
    else:
        pytest.fail("no ARP reply from the kernel")
    assert n == 12 + 42 and buf[12 : 12 + 6] == MAC_A
    backend.close()


def add_guest_neighbour(ipr: IPRoute, tap: str) -> None:
    """The guest's MAC for its IP on `tap` (a permanent entry: no ARP needed)."""
    ipr.neigh(
        "add",
        dst=GUEST_IP,
        lladdr=":".join(f"{b:02x}" for b in MAC_A),
        ifindex=netsetup.link_index(ipr, tap),
        state=0x80,  # NUD_PERMANENT
    )


def send_udp_flows(tap: str, count: int) -> Callable[[IPRoute], None]:
    """A function that sends `count` datagrams to the guest, each from its own port."""

    def send(ipr: IPRoute) -> None:
        add_guest_neighbour(ipr, tap)
        for _ in range(count):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"flow", (GUEST_IP, 9999))

    return send


async def test_each_pair_of_a_multiqueue_tap_receives(ns: str) -> None:
    tap = unique_tap()
    backend = TapBackend(tap=tap, netns=ns, address=f"{HOST_IP}/24", queues=2)
    assert backend.fileno(0) != backend.fileno(1) and backend.fileno(2) is None
    device = NetDevice(backend, mac=MAC_A, queues=2)
    rig = Rig(device, features=NetFeature.MRG_RXBUF | NetFeature.MQ)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        for pair in (0, 1):
            rig.add_rx(pair, [1536], count=64)
        await trio.to_thread.run_sync(netsetup.with_iproute, ns, send_udp_flows(tap, 48))
        with trio.fail_after(5):
            while device.stats()["rx0_frames"] + device.stats()["rx1_frames"] < 48:
                await trio.sleep(0.01)
        await rig.stop()
        nursery.cancel_scope.cancel()
    backend.close()
    stats = device.stats()
    assert stats["rx0_frames"] > 0 and stats["rx1_frames"] > 0  # the kernel used both


async def test_a_stopped_pair_gets_no_frames_from_the_kernel(ns: str) -> None:
    """Only pair 0 runs (a guest with one vCPU): the kernel steers nothing to the TAP
    queue of pair 1, whose fd nobody reads."""
    tap = unique_tap()
    backend = TapBackend(tap=tap, netns=ns, address=f"{HOST_IP}/24", queues=2)
    device = NetDevice(backend, mac=MAC_A, queues=2)
    rig = Rig(device, features=NetFeature.MRG_RXBUF | NetFeature.MQ)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery, queues=[0, 1])
        rig.add_rx(0, [1536], count=64)
        await trio.to_thread.run_sync(netsetup.with_iproute, ns, send_udp_flows(tap, 32))
        with trio.fail_after(5):
            while device.stats()["rx0_frames"] < 32:
                await trio.sleep(0.01)
        await rig.stop()
        nursery.cancel_scope.cancel()
    backend.close()


async def test_the_front_ends_mtu_reaches_the_tap(ns: str) -> None:
    tap = unique_tap()
    backend = TapBackend(tap=tap, netns=ns, mtu=1500)
    device = NetDevice(backend, mtu=1500)
    assert await device.handle_message(Request.NET_SET_MTU, 9000) is None
    attrs = link(ns, tap)
    assert attrs is not None and attrs["mtu"] == 9000
    assert device.mtu == 9000
    with pytest.raises(DeviceError, match="NET_SET_MTU"):
        await device.handle_message(Request.NET_SET_MTU, 65535)  # beyond a TAP's maximum
    backend.close()
