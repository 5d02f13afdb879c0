"""Host network plumbing for net backends and demos: TAP, bridge, addresses, netns.

Everything here is blocking (netlink round trips, a thread per namespace switch) and is
meant for startup and teardown, from a worker thread, never from the event loop.

Network namespaces are per thread on Linux, so `in_netns` runs a function in a fresh
thread that has entered the namespace: netlink sockets and TAP file descriptors opened
there belong to that namespace and stay usable from any thread afterwards.

Exports (public for net backends; `NetSetupError` or `OSError` / pyroute2's
`NetlinkError` on failure):

- namespaces: `netns_exists`, `create_netns`, `remove_netns`, `in_netns`,
  `with_iproute` (an IPRoute socket in a namespace);
- links: `check_ifname`, `link_index`, `create_tap`, `create_bridge`, `remove_link`,
  `move_link`, `has_carrier`, `set_up`, `set_mtu`, `set_master`, `add_address`;
- TAP file descriptors: `open_tap` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR),
  `set_vnet_hdr_size`, `set_offload` (`TunOffload` flags), `set_queue_attached`.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import struct
import threading
from collections.abc import Callable
from enum import IntFlag
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

__all__ = [
    "NetSetupError",
    "TunOffload",
    "add_address",
    "check_ifname",
    "create_bridge",
    "create_netns",
    "create_tap",
    "has_carrier",
    "in_netns",
    "link_index",
    "move_link",
    "netns_exists",
    "open_tap",
    "remove_link",
    "remove_netns",
    "set_master",
    "set_mtu",
    "set_offload",
    "set_queue_attached",
    "set_up",
    "set_vnet_hdr_size",
    "with_iproute",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

NETNS_DIR = Path("/var/run/netns")
TUN_DEVICE = "/dev/net/tun"
#: Longest interface name the kernel accepts (IFNAMSIZ - 1).
IFNAME_MAX = 15


class TunIoctl:
    """ioctl request numbers of /dev/net/tun (linux/if_tun.h, _IOW('T', n, int))."""

    TUNSETIFF = 0x400454CA
    TUNSETOFFLOAD = 0x400454D0
    TUNSETVNETHDRSZ = 0x400454D8
    TUNSETQUEUE = 0x400454D9


class TunFlag(IntFlag):
    """`ifr_flags` of TUNSETIFF."""

    IFF_TAP = 0x0002
    IFF_MULTI_QUEUE = 0x0100
    IFF_ATTACH_QUEUE = 0x0200
    IFF_DETACH_QUEUE = 0x0400
    IFF_NO_PI = 0x1000
    IFF_VNET_HDR = 0x4000


class TunOffload(IntFlag):
    """TUNSETOFFLOAD bits: what the TAP may hand us (checksum-partial, GSO frames)."""

    CSUM = 0x01
    TSO4 = 0x02
    TSO6 = 0x04
    TSO_ECN = 0x08
    UFO = 0x10


_IFREQ = struct.Struct("16sH22x")
#: The fields of pyroute2's tuntap `ifr` flags (all must be given).
_TUN_IFR_FLAGS = (
    "no_pi",
    "one_queue",
    "vnet_hdr",
    "tun_excl",
    "multi_queue",
    "persist",
    "nofilter",
)
_INT = struct.Struct("i")


class NetSetupError(Exception):
    """A network object cannot be created, found or removed."""


def check_ifname(name: str) -> str:
    """Return `name` if it is a valid interface name, else raise ValueError."""
    bad = not name or len(name) > IFNAME_MAX or name in (".", "..")
    if bad or any(c in name for c in "/: \t\n"):
        raise ValueError(f"invalid interface name {name!r} (1-{IFNAME_MAX} characters, no '/')")
    return name


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def create_netns(name: str) -> None:
    """Create the named network namespace (like `ip netns add`) and bring its lo up."""
    if netns_exists(name):
        raise NetSetupError(f"network namespace {name!r} already exists")
    netns.create(name)
    with_iproute(name, lambda ipr: set_up(ipr, "lo"))


def remove_netns(name: str) -> None:
    """Remove the named network namespace; its interfaces go with it."""
    netns.remove(name)


def in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """Call `fn` in a new thread inside network namespace `name` (None: the current one)."""
    if name is not None and not netns_exists(name):
        raise NetSetupError(f"no network namespace named {name!r}")
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            if name is not None:
                netns.setns(name, flags=0)
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{name}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def with_iproute(name: str | None, fn: Callable[[IPRoute], T]) -> T:
    """Call `fn(ipr)` with an IPRoute socket of network namespace `name`."""

    def body() -> T:
        with IPRoute() as ipr:
            return fn(ipr)

    return in_netns(name, body)


def link_index(ipr: IPRoute, ifname: str) -> int | None:
    """The ifindex of `ifname`, or None if there is no such link."""
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _index(ipr: IPRoute, ifname: str) -> int:
    index = link_index(ipr, ifname)
    if index is None:
        raise NetSetupError(f"no network interface named {ifname!r}")
    return index


def create_tap(ipr: IPRoute, ifname: str, *, multi_queue: bool = False) -> None:
    """Create a persistent TAP interface (it survives our fds until `remove_link`)."""
    extra = {"ifr": {**dict.fromkeys(_TUN_IFR_FLAGS, 0), "multi_queue": 1}} if multi_queue else {}
    ipr.link("add", ifname=check_ifname(ifname), kind="tuntap", mode="tap", **extra)


def create_bridge(ipr: IPRoute, ifname: str) -> None:
    ipr.link("add", ifname=check_ifname(ifname), kind="bridge")


def remove_link(ipr: IPRoute, ifname: str) -> bool:
    """Delete `ifname`; False if it was already gone."""
    index = link_index(ipr, ifname)
    if index is None:
        return False
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise
        return False
    return True


def move_link(ipr: IPRoute, ifname: str, netns_name: str) -> None:
    """Move `ifname` into network namespace `netns_name`; fds open on it stay valid."""
    ipr.link("set", index=_index(ipr, ifname), net_ns_fd=netns_name)


def has_carrier(ipr: IPRoute, ifname: str) -> bool:
    """Whether `ifname` exists and has carrier (a TAP: some process has it open)."""
    index = link_index(ipr, ifname)
    return index is not None and ipr.get_links(index)[0].get_attr("IFLA_CARRIER") == 1


def set_up(ipr: IPRoute, ifname: str) -> None:
    ipr.link("set", index=_index(ipr, ifname), state="up")


def set_mtu(ipr: IPRoute, ifname: str, mtu: int) -> None:
    ipr.link("set", index=_index(ipr, ifname), mtu=mtu)


def set_master(ipr: IPRoute, ifname: str, bridge: str) -> None:
    """Attach `ifname` to bridge `bridge` as a port."""
    ipr.link("set", index=_index(ipr, ifname), master=_index(ipr, bridge))


def add_address(ipr: IPRoute, ifname: str, address: str) -> None:
    """Assign `address` ("10.0.3.1/24" or "fd00::1/64") to `ifname`."""
    iface = ipaddress.ip_interface(address)
    ipr.addr(
        "add",
        index=_index(ipr, ifname),
        address=str(iface.ip),
        prefixlen=iface.network.prefixlen,
    )


def open_tap(ifname: str, *, vnet_hdr: bool = True, multi_queue: bool = False) -> int:
    """Open a non-blocking data fd on TAP `ifname` (created on the fly if missing).

    With `multi_queue`, each fd opened is one more queue of a multi-queue TAP (EINVAL
    if the TAP exists without IFF_MULTI_QUEUE, or with it and `multi_queue` is off).
    Call it inside the right namespace (`in_netns`): TUNSETIFF looks the name up in
    the calling thread's namespace.
    """
    flags = TunFlag.IFF_TAP | TunFlag.IFF_NO_PI
    if vnet_hdr:
        flags |= TunFlag.IFF_VNET_HDR
    if multi_queue:
        flags |= TunFlag.IFF_MULTI_QUEUE
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TunIoctl.TUNSETIFF, _IFREQ.pack(check_ifname(ifname).encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_vnet_hdr_size(fd: int, size: int) -> None:
    """TUNSETVNETHDRSZ: the virtio-net header size in front of every frame."""
    fcntl.ioctl(fd, TunIoctl.TUNSETVNETHDRSZ, _INT.pack(size))


def set_offload(fd: int, offload: TunOffload) -> None:
    """TUNSETOFFLOAD: which offloaded frames the TAP may deliver to us."""
    fcntl.ioctl(fd, TunIoctl.TUNSETOFFLOAD, int(offload))  # by value, not by pointer


def set_queue_attached(fd: int, attached: bool) -> None:
    """TUNSETQUEUE: attach or detach a multi-queue TAP's queue `fd` (a detached queue
    gets no frames from the kernel)."""
    flag = TunFlag.IFF_ATTACH_QUEUE if attached else TunFlag.IFF_DETACH_QUEUE
    fcntl.ioctl(fd, TunIoctl.TUNSETQUEUE, _IFREQ.pack(b"", flag))
