"""The built-in net backends on their own (echo, switch, responder) and behind devices."""

from __future__ import annotations

import itertools
import struct
import tracemalloc
from collections.abc import Iterator

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from net_helpers import MAC_A, MAC_B, Rig, arp_request, eth_frame, icmp_echo, naive_checksum
from vdev_backends.net_echo import EchoBackend
from vdev_backends.net_responder import ResponderBackend, internet_checksum
from vdev_backends.net_switch import SwitchPort, get_switch

from vdev.backend import BackendError
from vdev.devices.net import NetDevice, NetFeature

BROADCAST = b"\xff" * 6
MAC_C = bytes.fromhex("525400000003")
_names = itertools.count()


def mv(data: bytes) -> list[list[memoryview]]:
    """A batch of one frame as a device hands it over: a scatter list (cut in two)."""
    return [[memoryview(data)[:7], memoryview(data)[7:]]]


class Port:
    """A switch port with a recording deliver function."""

    def __init__(self, switch: str) -> None:
        self.backend = SwitchPort(switch=switch)
        self.got: list[bytes] = []
        self.backend.attach(lambda frame: self.got.append(bytes(frame)) is None)

    def send(self, frame: bytes) -> None:
        self.backend.transmit(mv(frame))


@pytest.fixture
def switch_name() -> Iterator[str]:
    name = f"test-switch-{next(_names)}"
    yield name
    assert get_switch(name) is None, "every port was closed: the switch is gone"


# --- echo ------------------------------------------------------------------------------


def test_echo_swaps_macs() -> None:
    echo = EchoBackend()
    got: list[bytes | memoryview] = []
    echo.attach(lambda frame: got.append(frame) is None)
    frame = eth_frame(MAC_B, MAC_A, b"ping")
    echo.transmit(mv(frame))
    assert [bytes(g) for g in got] == [MAC_A + MAC_B + frame[12:]]


# --- switch ----------------------------------------------------------------------------


def test_switch_floods_then_learns(switch_name: str) -> None:
    a, b, c = (Port(switch_name) for _ in range(3))
    a_to_b = eth_frame(MAC_B, MAC_A, b"who is b?")
    a.send(a_to_b)  # B unknown: flooded to B and C, never back to A
    assert (a.got, b.got, c.got) == ([], [a_to_b], [a_to_b])
    b_to_a = eth_frame(MAC_A, MAC_B, b"b here")
    b.send(b_to_a)  # A was learned from its first frame: only A gets it
    assert (a.got, b.got, c.got) == ([b_to_a], [a_to_b], [a_to_b])
    a.send(a_to_b)  # now B is known too
    assert (a.got, b.got, c.got) == ([b_to_a], [a_to_b, a_to_b], [a_to_b])
    broadcast = eth_frame(BROADCAST, MAC_C, b"all")
    c.send(broadcast)
    assert a.got[-1] == b.got[-1] == broadcast and c.got == [a_to_b]
    sw = get_switch(switch_name)
    assert sw is not None and (sw.forwarded, sw.flooded) == (2, 2)
    assert set(sw.fdb) == {MAC_A, MAC_B, MAC_C}
    for port in (a, b, c):
        port.backend.close()


def test_switch_forgets_a_closed_port_and_ages_entries(switch_name: str) -> None:
    a, b, c = (Port(switch_name) for _ in range(3))
    b.send(eth_frame(MAC_A, MAC_B, b"learn b"))
    b.backend.close()
    sw = get_switch(switch_name)
    assert sw is not None and MAC_B not in sw.fdb
    c.send(eth_frame(MAC_C, MAC_C, b"learn c"))
    sw.fdb[MAC_C] = (sw.fdb[MAC_C][0], sw.fdb[MAC_C][1] - 1000)  # older than aging
    a.send(eth_frame(MAC_C, MAC_A, b"to c"))
    assert MAC_C not in sw.fdb
    assert c.got[-1][12:] == b"\x88\xb5to c"  # flooded again once aged out
    a.backend.close()
    c.backend.close()


def test_switch_port_before_attach_drops(switch_name: str) -> None:
    lonely = SwitchPort(switch=switch_name)
    sender = Port(switch_name)
    sender.send(eth_frame(BROADCAST, MAC_A, b"anyone?"))
    assert lonely.dropped == 1
    lonely.close()
    sender.backend.close()


def test_switch_options() -> None:
    with pytest.raises(BackendError, match="aging"):
        SwitchPort(aging="soon")
    with pytest.raises(BackendError, match="aging"):
        SwitchPort(aging=0)
    with pytest.raises(BackendError, match="switch"):
        SwitchPort(switch="")


async def test_three_devices_on_one_switch(switch_name: str) -> None:
    macs = [MAC_A, MAC_B, MAC_C]
    ports = [SwitchPort(switch=switch_name) for _ in macs]
    rigs = [
        Rig(NetDevice(p, mac=m), features=NetFeature.MRG_RXBUF)
        for p, m in zip(ports, macs, strict=True)
    ]
    hello = [eth_frame(BROADCAST, mac, b"hello from %d" % i) for i, mac in enumerate(macs)]
    a_to_c = eth_frame(MAC_C, MAC_A, b"unicast to c")
    async with trio.open_nursery() as nursery:
        for rig in rigs:
            await rig.start(nursery)
            rig.add_rx(0, [2048], count=8)
        for rig, frame in zip(rigs, hello, strict=True):
            rig.send(0, frame)
            await rig.wait_used(1, 1)
        rigs[0].send(0, a_to_c)
        got = [
            [f[12:] for f in await rig.receive(0, n)]
            for rig, n in zip(rigs, (2, 2, 3), strict=True)
        ]
        for rig in rigs:
            await rig.settle()
        assert rigs[1].rings[0].get_used() == []  # B never saw the unicast
        for rig in rigs:
            await rig.stop()
        nursery.cancel_scope.cancel()
    assert got[0] == [hello[1], hello[2]]
    assert got[1] == [hello[0], hello[2]]
    assert got[2] == [hello[0], hello[1], a_to_c]
    for port in ports:
        port.close()


# --- responder -------------------------------------------------------------------------


def make_responder() -> tuple[ResponderBackend, list[bytes]]:
    responder = ResponderBackend(address="10.0.2.2/24", host_mac="52:55:0a:00:02:02")
    got: list[bytes] = []
    responder.attach(lambda frame: got.append(bytes(frame)) is None)
    return responder, got


def test_responder_answers_arp() -> None:
    responder, got = make_responder()
    responder.transmit(mv(arp_request(MAC_A, "10.0.2.15", "10.0.2.2")))
    responder.transmit(mv(arp_request(MAC_A, "10.0.2.15", "10.0.2.3")))  # not us
    [reply] = got
    host_mac = bytes.fromhex("52550a000202")
    assert reply[:14] == MAC_A + host_mac + b"\x08\x06"
    assert struct.unpack("!HHBBH6s4s6s4s", reply[14:42]) == (
        1, 0x0800, 6, 4, 2,
        host_mac, bytes([10, 0, 2, 2]), MAC_A, bytes([10, 0, 2, 15]),
    )  # fmt: skip
    assert len(reply) == 60
    assert (responder.arp_replies, responder.ignored) == (1, 1)


@pytest.mark.parametrize("options", [b"", b"\x01\x01\x01\x00"], ids=["plain", "ip-options"])
@pytest.mark.parametrize("size", [0, 56, 1001])
def test_responder_answers_ping_with_correct_checksums(options: bytes, size: int) -> None:
    responder, got = make_responder()
    host_mac = responder.mac
    payload = bytes(i * 7 % 256 for i in range(size))
    request = icmp_echo(host_mac, "10.0.2.15", "10.0.2.2", payload, options)
    responder.transmit(mv(request + b"\0" * 4))  # trailing padding is not part of IP
    [reply] = got
    assert reply[:12] == MAC_A + host_mac
    ip = reply[14:]
    ihl = (ip[0] & 15) * 4
    assert naive_checksum(ip[:ihl]) == 0
    assert ip[12:16] == bytes([10, 0, 2, 2]) and ip[16:20] == bytes([10, 0, 2, 15])
    icmp = ip[ihl:]
    assert len(icmp) == 8 + size
    assert naive_checksum(icmp) == 0
    assert icmp[0] == 0 and icmp[4:] == request[14 + ihl + 4 :]
    assert responder.echo_replies == 1


def test_responder_ignores_bad_or_foreign_pings() -> None:
    responder, got = make_responder()
    good = icmp_echo(responder.mac, "10.0.2.15", "10.0.2.2", b"x" * 10)
    corrupt = bytearray(good)
    corrupt[-1] ^= 1
    for frame in (
        bytes(corrupt),
        icmp_echo(responder.mac, "10.0.2.15", "10.0.2.9", b"x"),  # another address
        icmp_echo(MAC_B, "10.0.2.15", "10.0.2.2", b"x"),  # another MAC
        good[:30],  # truncated
        b"\0" * 5,
    ):
        responder.transmit(mv(frame))
    assert got == [] and responder.ignored == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"address": "10.0.2"}, "address"),
        ({"address": "fd00::1/64"}, "address"),
        ({"host_mac": "nope"}, "host_mac"),
    ],
)
def test_responder_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(BackendError, match=message):
        ResponderBackend(**options)


async def test_guest_pings_responder_through_device() -> None:
    responder = ResponderBackend()
    rig = Rig(NetDevice(responder, mac=MAC_A), features=NetFeature.MRG_RXBUF)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        rig.add_rx(0, [1536], count=4)
        rig.send(0, arp_request(MAC_A, "10.0.2.15", "10.0.2.2"))
        rig.send(0, icmp_echo(responder.mac, "10.0.2.15", "10.0.2.2", b"abc" * 20))
        arp, pong = await rig.receive(0, 2)
        await rig.stop()
        nursery.cancel_scope.cancel()
    assert arp[12 + 12 : 12 + 14] == b"\x08\x06" and arp[12 + 20 : 12 + 22] == b"\0\2"
    assert pong[12 + 12 : 12 + 14] == b"\x08\x00" and pong[12 + 34] == 0


@given(st.binary(max_size=3000))
def test_internet_checksum_matches_rfc1071(data: bytes) -> None:
    assert internet_checksum(data) == naive_checksum(data)


# --- frames beyond any size limit ------------------------------------------------------


def test_backends_that_join_frames_drop_huge_ones_first(switch_name: str) -> None:
    """A 512 MiB scatter list (1024 views of one 512 KiB buffer) is never joined."""
    piece = memoryview(bytearray(512 << 10))
    huge = [[piece] * 1024]
    port, peer = Port(switch_name), Port(switch_name)
    responder, replies = make_responder()
    echo = EchoBackend()
    echoed: list[bytes | memoryview] = []
    echo.attach(lambda frame: echoed.append(frame) is None)
    tracemalloc.start()
    try:
        assert port.backend.transmit(huge) == 1
        assert responder.transmit(huge) == 1
        assert echo.transmit(huge) == 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert peer.got == replies == echoed == []
    port.backend.close()
    peer.backend.close()
