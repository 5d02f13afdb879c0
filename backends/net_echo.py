"""A loopback port: every frame the guest sends comes back to it."""

from __future__ import annotations

from collections.abc import Sequence

from vdev.backend import NetBackend
from vdev.net import MAX_TX_FRAME, frame_len


class EchoBackend(NetBackend):
    """Returns each frame to the guest with source and destination MAC swapped."""

    def transmit(self, frames: list[Sequence[memoryview]]) -> int:
        deliver = self.deliver
        dropped = 0
        for frame in frames:
            if frame_len(frame) > MAX_TX_FRAME:
                dropped += 1
                continue
            echo = bytearray(frame[0]) if len(frame) == 1 else bytearray().join(frame)
            if len(echo) >= 12:
                echo[0:12] = echo[6:12] + echo[0:6]
            deliver(echo)
        return dropped
