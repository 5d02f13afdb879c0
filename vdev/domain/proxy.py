"""Backends in a driver domain: start one, and attach its proxy to a device.

`open_backend` starts the child (`DomainHost`) and returns the proxy the device uses
as its backend (`BlockProxy`, `NetProxy`); `attach` routes a block device's queues
through the domain's executors.
"""

from __future__ import annotations

from typing import Any

from vdev.devices.base import Device
from vdev.devices.blk import BlkDevice
from vdev.domain.blk_proxy import BLK_LANE_RING, BLK_SYNC_RING, MAX_LANES, BlockProxy
from vdev.domain.host import DomainError, DomainHost
from vdev.domain.net_proxy import NET_RINGS, NET_TX, NetProxy
from vdev.domain.spec import DomainSpec
from vdev.plugins import Kind


def open_backend(
    kind: Kind, name: str, options: dict[str, Any], spec: DomainSpec
) -> BlockProxy | NetProxy:
    """Start backend `name` with `options` in a driver domain; return its proxy.

    Raises `DomainError` (with the backend's own message) if it cannot be built.
    """
    proxy: type[BlockProxy] | type[NetProxy]
    if kind == Kind.BLK_BACKEND:
        proxy = BlockProxy

        def rings(attributes: dict[str, Any]) -> list[tuple[int, int, int]]:
            wanted = attributes.get("max_concurrency", 1)
            lanes = min(max(wanted, 1), MAX_LANES) if type(wanted) is int else 1
            return [BLK_SYNC_RING[spec.memory]] + [BLK_LANE_RING[spec.memory]] * lanes

        host = DomainHost(kind, name, options, spec, rings)
    elif kind == Kind.NET_BACKEND:
        proxy = NetProxy
        host = DomainHost(kind, name, options, spec, lambda _: NET_RINGS, drop_on_restart={NET_TX})
    else:
        raise DomainError(f"{kind.label}s cannot run in a driver domain")
    try:
        return proxy(host)
    except BaseException:
        host.close()
        raise


def attach(device: Device, backend: BlockProxy | NetProxy) -> None:
    """Run the device's requests in the domain (each queue on an executor of its own)."""
    if isinstance(backend, BlockProxy) and isinstance(device, BlkDevice):
        device.executor_factory = backend.executor
