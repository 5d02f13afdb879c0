"""Test helpers for vdev devices and backends, for plugin authors as much as for vdev.

- `Frontend`, `serve_device` (`vdev.testing.frontend`): serve a device on a real
  socket and drive it as a vhost-user front-end would (negotiation, memfd guest
  memory, split or packed rings, chains in, completions out; the back-end channel's
  requests collected); `running_server` yields the `DeviceServer` itself. A front-end
  can keep an in-flight buffer (`InflightFd`, GET_INFLIGHT_FD) and its guest memory,
  and hand both and its rings to a restarted device (`Frontend.resume_queue`), as QEMU
  does after a reconnect.
- `FakeGuestMemory` (`vdev.testing.fakemem`) and the driver rings
  (`vdev.testing.driver_rings`): pure unit tests with no socket at all.
- `vdev.testing.guest`: boot a real Linux guest under QEMU with your device attached,
  run a shell script in it and get its output (imported on demand: it needs QEMU).
"""

from vdev.testing.driver_rings import DriverPackedRing, DriverSplitRing, UsedBuffer
from vdev.testing.fakemem import FakeGuestMemory
from vdev.testing.frontend import (
    Frontend,
    FrontendError,
    FrontendQueue,
    InflightFd,
    running_server,
    serve_device,
)

__all__ = [
    "DriverPackedRing",
    "DriverSplitRing",
    "FakeGuestMemory",
    "Frontend",
    "FrontendError",
    "FrontendQueue",
    "InflightFd",
    "UsedBuffer",
    "running_server",
    "serve_device",
]
