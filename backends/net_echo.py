"""A loopback port: every frame the guest sends comes back to it."""

from __future__ import annotations

from collections.abc import Sequence

from vdev.backend import NetBackend


class EchoBackend(NetBackend):
    """Returns each frame to the guest with source and destination MAC swapped."""

    def transmit(self, frame: Sequence[memoryview]) -> None:
        echo = bytearray().join(frame)
        if len(echo) >= 12:
            echo[0:6], echo[6:12] = echo[6:12], echo[0:6]
        self.deliver(echo)
