"""A Linux TAP interface as the guest's Ethernet port.

The TAP is opened with IFF_VNET_HDR, so frames cross with their virtio-net header and
the kernel carries checksum and segmentation offloads both ways. Frames move with
os.readv/os.writev straight between guest memory and the TAP: no copy in Python. With
several queue pairs the TAP is multi-queue (IFF_MULTI_QUEUE), one fd per pair, and the
kernel spreads flows over the pairs' fds.
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
from vdev.backend import BackendError, NetBackend, int_option
from vdev.net import NetFeature, vnet_hdr_len
from vdev.netsetup import TunOffload

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
    puts everything in that existing network namespace; `mtu` sets the TAP's MTU (the
    front-end's NET_SET_MTU, later, wins); `address` ("10.0.3.1/24") gives the host
    side of the TAP an IP address; `queues` (the device's queue pairs) opens that many
    queues of a multi-queue TAP.
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
        queues: int | str = 1,
    ) -> None:
        self.tap = _checked("tap", tap)
        self.bridge = None if bridge is None else _checked("bridge", bridge)
        self.netns = netns
        self.mtu = None if mtu is None else int_option("mtu", mtu, 68, 65521)
        self.queues = int_option("queues", queues, 1, 256)
        if address is not None:
            try:
                ipaddress.ip_interface(address)
            except ValueError:
                raise BackendError(f"address: {address!r} is not like 10.0.3.1/24") from None
        if netns is not None and not netsetup.netns_exists(netns):
            raise BackendError(f"netns: no network namespace named {netns!r}")
        self._created: list[str] = []
        #: One fd per queue pair (a single one if the TAP is not multi-queue).
        self._fds: list[int] = []
        self._attached: list[bool] = []
        try:
            self._fds = netsetup.in_netns(netns, lambda: self._setup(address))
            self._attached = [True] * len(self._fds)
        except (OSError, NetlinkError, netsetup.NetSetupError) as exc:
            self._undo()
            raise BackendError(f"tap: cannot set up {tap!r}: {_reason(exc)}") from None
        self._hdr_len = 0
        self._offload: TunOffload | None = None
        self.set_features(0)
        log.info("TAP %s ready%s", tap, f" in netns {netns}" if netns else "")

    def _setup(self, address: str | None) -> list[int]:
        """Create what is missing and open the TAP's queues (runs inside the namespace)."""
        with IPRoute() as ipr:
            multi_queue = self.queues > 1
            if netsetup.link_index(ipr, self.tap) is None:
                netsetup.create_tap(ipr, self.tap, multi_queue=multi_queue)
                self._created.append(self.tap)
            fds = self._open_queues(multi_queue)
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
                for fd in fds:
                    os.close(fd)
                raise
        return fds

    def _open_queues(self, multi_queue: bool) -> list[int]:
        """`queues` fds on a multi-queue TAP, or one on a TAP that is not."""
        try:
            first = netsetup.open_tap(self.tap, multi_queue=multi_queue)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not multi_queue:
                raise
            log.warning("TAP %s is not multi-queue: every pair receives on queue 0", self.tap)
            return [netsetup.open_tap(self.tap)]
        fds = [first]
        try:
            while len(fds) < self.queues:
                fds.append(netsetup.open_tap(self.tap, multi_queue=True))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def set_features(self, features: int) -> None:
        hdr_len = vnet_hdr_len(features)
        offload = TunOffload(0)
        if features & NetFeature.GUEST_CSUM:
            for feature, tun_flag in _TUN_OFFLOADS:
                if features & feature:
                    offload |= tun_flag
        for fd in self._fds:
            if hdr_len != self._hdr_len:
                netsetup.set_vnet_hdr_size(fd, hdr_len)
            if offload != self._offload:
                netsetup.set_offload(fd, offload)
        self._hdr_len = hdr_len
        self._offload = offload

    def set_mtu(self, mtu: int) -> None:
        try:
            netsetup.with_iproute(self.netns, lambda ipr: netsetup.set_mtu(ipr, self.tap, mtu))
        except NetlinkError as exc:
            raise OSError(exc.code, _reason(exc)) from None
        log.info("TAP %s: MTU %d, as the front-end set it", self.tap, mtu)

    def transmit(self, frames: list[Sequence[memoryview]]) -> int:
        """One writev per frame (a TAP takes one frame per write); returns the failures."""
        fd = self._fds[0]
        failed = 0
        for frame in frames:
            try:
                os.writev(fd, frame)
            except OSError as exc:
                failed += 1
                log.debug("TAP %s: frame not sent: %s", self.tap, exc)
        return failed

    def fileno(self, pair: int = 0) -> int | None:
        return self._fds[pair] if pair < len(self._fds) else None

    def enable_queue(self, pair: int, enabled: bool) -> None:
        if len(self._fds) > 1 and pair < len(self._fds) and self._attached[pair] != enabled:
            netsetup.set_queue_attached(self._fds[pair], enabled)
            self._attached[pair] = enabled

    def receive_into(self, buffers: Sequence[memoryview], pair: int = 0) -> int:
        return os.readv(self._fds[pair], buffers)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
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
