"""What the control socket tells about a device: its state, and its counters.

Read on the event loop while the queue workers run: the counters are plain ints
(and dicts whose keys are all there from the start) that worker threads bump without
a lock, so a snapshot may miss the latest increments — never more than that. Device
counters (`Device.stats`, `Device.queue_stats`) cover the device's life; the ring
counters (kicks, notifies, polls, resubmitted) the current session only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntFlag

from vdev.devices.base import Device
from vdev.domain.host import DomainHost
from vdev.protocol import ProtocolFeature
from vdev.protocol.describe import DeviceStatus, FlagSet, VhostFeature
from vdev.server import DeviceServer
from vdev.trace import DEVICE_FEATURES
from vdev.virtio.features import VirtioFeature
from vdev.vring import Vring

Json = dict[str, object]


@dataclass(frozen=True)
class ManagedDevice:
    """A device of the daemon, as the control socket names it."""

    name: str
    #: Its device type (blk, net, or a plugin's).
    kind: str
    server: DeviceServer


def device_state(managed: ManagedDevice, *, counters: bool = False) -> Json:
    """The device's state: front-end, negotiated features, queues, in-flight requests,
    driver domain; with `counters`, its statistics and its queues' too."""
    server = managed.server
    session = server.session
    state: Json = {
        "name": managed.name,
        "type": managed.kind,
        "socket": str(server.path),
        "client": server.client,
        "connected": session is not None,
        "sessions": server.sessions,
        "status": None,
        "features": None,
        "protocol_features": None,
    }
    queues: list[Json] = []
    if session is not None:
        device_bits = DEVICE_FEATURES.get(managed.kind)
        feature_types = (VirtioFeature, *([device_bits] if device_bits else []), VhostFeature)
        state["status"] = _flags(session.status, (DeviceStatus,))
        state["features"] = _flags(session.conn.acked_features, feature_types)
        state["protocol_features"] = _flags(
            session.conn.acked_protocol_features, (ProtocolFeature,)
        )
        queues = [queue_state(v, server.device, counters=counters) for v in session.vrings]
    state["in_flight"] = sum(q["in_flight"] for q in queues)  # type: ignore[misc]
    state["queues"] = queues
    state["domain"] = domain_state(server.device)
    if counters:
        state["counters"] = server.device.stats()
    return state


def queue_state(vring: Vring, device: Device, *, counters: bool = False) -> Json:
    """One queue: size, enabled, in flight, why it failed; with `counters`, the ring's
    counters (kicks, notifies, polls that found work, resubmitted) and the device's."""
    ring = vring.ring
    state: Json = {
        "index": vring.index,
        "size": vring.size,
        "enabled": vring.enabled,
        "running": vring.running,
        "in_flight": ring.in_flight if ring is not None else 0,
        "failure": vring.failure,
    }
    if counters:
        state.update(device.queue_stats(vring.index))
        state.update(
            kicks=vring.kicks,
            notifies=vring.notifies,
            polls=vring.polls,
            resubmitted=vring.resubmitted,
        )
    return state


def domain_state(device: Device) -> Json | None:
    """The driver domain running the device's backend (child pid, restarts, ...), if
    it runs in one."""
    host = getattr(getattr(device, "backend", None), "host", None)
    if not isinstance(host, DomainHost):
        return None
    state: Json = {
        "status": host.status,
        "pid": host.pid,
        "memory": host.spec.memory,
        "failure": host.failure,
    }
    state.update({key.removeprefix("domain_"): n for key, n in host.stats().items()})
    return state


def _flags(value: int, types: Iterable[type[IntFlag]]) -> Json:
    return {"hex": f"{value:#x}", "names": list(FlagSet.of(value, types).names)}
