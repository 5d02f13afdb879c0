"""A learning Ethernet switch in the vdev process: ports are `SwitchPort` backends.

All ports created with the same switch name (in one process) share one switch, so
several vdev NICs can talk to each other with no TAP, bridge or root privilege.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from vdev.backend import BackendError, NetBackend
from vdev.net import join_frame

log = logging.getLogger(__name__)


class Switch:
    """A learning L2 switch: unknown, broadcast and multicast destinations are flooded."""

    def __init__(self, name: str, aging: float) -> None:
        self.name = name
        self.aging = aging
        self.ports: list[SwitchPort] = []
        #: MAC address -> (port, time last seen as a source).
        self.fdb: dict[bytes, tuple[SwitchPort, float]] = {}
        self.forwarded = 0
        self.flooded = 0
        self.lock = threading.Lock()

    def forward(self, source: SwitchPort, frame: bytes) -> None:
        """Learn the sender's address, then send `frame` to its destination port(s)."""
        now = time.monotonic()
        dst, src = frame[0:6], frame[6:12]
        with self.lock:
            if not src[0] & 1:
                self.fdb[src] = (source, now)
            entry = None if dst[0] & 1 else self.fdb.get(dst)
            if entry is not None and now - entry[1] > self.aging:
                del self.fdb[dst]
                entry = None
            if entry is not None:
                targets = [] if entry[0] is source else [entry[0]]
                self.forwarded += 1
            else:
                targets = [port for port in self.ports if port is not source]
                self.flooded += 1
        for port in targets:
            port.receive(frame)

    def remove(self, port: SwitchPort) -> None:
        with self.lock:
            self.ports.remove(port)
            for mac in [mac for mac, (owner, _) in self.fdb.items() if owner is port]:
                del self.fdb[mac]


_switches: dict[str, Switch] = {}
_registry_lock = threading.Lock()


def get_switch(name: str) -> Switch | None:
    """The switch called `name`, if a port on it is open."""
    return _switches.get(name)


class SwitchPort(NetBackend):
    """One port of switch `switch` (shared by name within the process).

    `aging`: seconds after which a learned address is forgotten (the first port's
    value sets it for the switch).
    """

    def __init__(self, switch: str = "default", aging: float | str = 300.0) -> None:
        if not switch:
            raise BackendError("switch: the switch needs a name")
        try:
            aging = float(aging)
        except ValueError:
            raise BackendError(f"aging: {aging!r} is not a number of seconds") from None
        if aging <= 0:
            raise BackendError(f"aging: {aging} must be positive")
        with _registry_lock:
            sw = _switches.get(switch)
            if sw is None:
                sw = _switches[switch] = Switch(switch, aging)
            with sw.lock:
                sw.ports.append(self)
        self.switch: Switch | None = sw
        self.received = 0
        self.dropped = 0

    def transmit(self, frames: list[Sequence[memoryview]]) -> int:
        dropped = 0
        for frame in frames:
            data = join_frame(frame)
            if data is None or len(data) < 14 or self.switch is None:
                dropped += 1
            else:
                self.switch.forward(self, data)
        return dropped

    def receive(self, frame: bytes) -> None:
        """A frame from another port, for our guest."""
        if self.deliver(frame):
            self.received += 1
        else:
            self.dropped += 1

    def deliver(self, frame: bytes | memoryview) -> bool:
        """Frames arriving before a device attached are dropped."""
        return False

    def close(self) -> None:
        sw, self.switch = self.switch, None
        if sw is None:
            return
        with _registry_lock:
            sw.remove(self)
            if not sw.ports:
                del _switches[sw.name]
