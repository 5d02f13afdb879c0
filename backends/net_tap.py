"""A Linux TAP interface as the guest's Ethernet port.

The TAP is opened with IFF_VNET_HDR, so frames cross with their virtio-net header and
the kernel carries checksum and segmentation offloads both ways. Frames move with
os.readv/os.writev straight between guest memory and the TAP: no copy in Python.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
from collections.abc import Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vdev import netsetup
from vdev.backend import BackendError, NetBackend
from vdev.devices.net import NetFeature, vnet_hdr_len
from vdev.netsetup import TunOffload
from vdev.units import parse_int

log = logging.getLogger(__name__)

#: Guest offload feature -> the TAP offload that lets the kernel hand us such frames.
_TUN_OFFLOADS = (
    (NetFeature.GUEST_CSUM, TunOffload.CSUM),
    (NetFeature.GUEST_TSO4, TunOffload.TSO4),
    (NetFeature.GUEST_TSO6, TunOffload.TSO6),
    (NetFeature.GUEST_ECN, TunOffload.TSO_ECN),
)


class TapBackend(NetBackend):
    """Frames to and from TAP interface `tap` (created, and removed at close, if missing).

    Options: `bridge` attaches the TAP to that bridge (created if missing); `netns`
    puts everything in that existing network namespace; `mtu` sets the TAP's MTU;
    `address` ("10.0.3.1/24") gives the host side of the TAP an IP address.
    """

    vnet_hdr = True
    # UFO is left out: Linux accepts it but no longer produces or honours it on a TAP.
    offload_features = int(
        NetFeature.CSUM
        | NetFeature.GUEST_CSUM
        | NetFeature.GUEST_TSO4
        | NetFeature.GUEST_TSO6
        | NetFeature.GUEST_ECN
        | NetFeature.HOST_TSO4
        | NetFeature.HOST_TSO6
        | NetFeature.HOST_ECN
    )

    def __init__(
        self,
        tap: str,
        bridge: str | None = None,
        netns: str | None = None,
        mtu: int | str | None = None,
        address: str | None = None,
    ) -> None:
        self.tap = _checked("tap", tap)
        self.bridge = None if bridge is None else _checked("bridge", bridge)
        self.netns = netns
        self.mtu = _mtu_option(mtu)
        if address is not None:
            try:
                ipaddress.ip_interface(address)
            except ValueError:
                raise BackendError(f"address: {address!r} is not like 10.0.3.1/24") from None
        if netns is not None and not netsetup.netns_exists(netns):
            raise BackendError(f"netns: no network namespace named {netns!r}")
        self._created: list[str] = []
        self._fd = -1
        try:
            self._fd = netsetup.in_netns(netns, lambda: self._setup(address))
        except (OSError, NetlinkError, netsetup.NetSetupError) as exc:
            self._undo()
            raise BackendError(f"tap: cannot set up {tap!r}: {_reason(exc)}") from None
        self._hdr_len = 0
        self._offload: TunOffload | None = None
        self.set_features(0)
        log.info("TAP %s ready%s", tap, f" in netns {netns}" if netns else "")

    def _setup(self, address: str | None) -> int:
        """Create what is missing and open the TAP (runs inside the namespace)."""
        with IPRoute() as ipr:
            if netsetup.link_index(ipr, self.tap) is None:
                netsetup.create_tap(ipr, self.tap)
                self._created.append(self.tap)
            fd = netsetup.open_tap(self.tap)
            try:
                if self.mtu is not None:
                    netsetup.set_mtu(ipr, self.tap, self.mtu)
                if self.bridge is not None:
                    if netsetup.link_index(ipr, self.bridge) is None:
                        netsetup.create_bridge(ipr, self.bridge)
                        self._created.append(self.bridge)
                        netsetup.set_up(ipr, self.bridge)
                    netsetup.set_master(ipr, self.tap, self.bridge)
                if address is not None:
                    netsetup.add_address(ipr, self.tap, address)
                netsetup.set_up(ipr, self.tap)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def set_features(self, features: int) -> None:
        hdr_len = vnet_hdr_len(features)
        offload = TunOffload(0)
        if features & NetFeature.GUEST_CSUM:
            for feature, tun_flag in _TUN_OFFLOADS:
                if features & feature:
                    offload |= tun_flag
        if hdr_len != self._hdr_len:
            netsetup.set_vnet_hdr_size(self._fd, hdr_len)
            self._hdr_len = hdr_len
        if offload != self._offload:
            netsetup.set_offload(self._fd, offload)
            self._offload = offload

    def transmit(self, frame: Sequence[memoryview]) -> None:
        os.writev(self._fd, frame)

    def fileno(self) -> int:
        return self._fd

    def receive_into(self, buffers: Sequence[memoryview]) -> int:
        return os.readv(self._fd, buffers)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._undo()

    def _undo(self) -> None:
        """Remove the links we created, newest first."""
        if not self._created:
            return
        created, self._created = self._created, []
        if self.netns is not None and not netsetup.netns_exists(self.netns):
            return  # the namespace, and everything in it, is gone already

        def remove(ipr: IPRoute) -> None:
            for name in reversed(created):
                netsetup.remove_link(ipr, name)

        try:
            netsetup.with_iproute(self.netns, remove)
        except (OSError, NetlinkError) as exc:
            log.warning("could not remove %s: %s", ", ".join(created), _reason(exc))


def _checked(option: str, name: str) -> str:
    try:
        return netsetup.check_ifname(name)
    except ValueError as exc:
        raise BackendError(f"{option}: {exc}") from None


def _mtu_option(mtu: int | str | None) -> int | None:
    if mtu is None:
        return None
    try:
        return parse_int(mtu, 68, 65521)
    except ValueError as exc:
        raise BackendError(f"mtu: {exc}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        return f"{os.strerror(exc.code)} (netlink)"
    if isinstance(exc, OSError) and exc.errno == errno.EBUSY:
        return "in use by another process"
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL:
        return "exists and is not a TAP device"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc)
