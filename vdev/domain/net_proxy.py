"""The NetBackend a net device gets when its real backend runs in a driver domain.

Frames cross through bounce areas in both memory policies (the device completes a
transmit chain as soon as `transmit` returns, and reads received frames synchronously);
received frames reach the device through `fileno` / `receive_into`, as from a TAP.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence

from vdev.backend import NetBackend
from vdev.domain.attributes import attribute
from vdev.domain.channel import WRITE, ChannelError, Op, copy_views
from vdev.domain.host import DomainHost
from vdev.net import frame_len

MiB = 1 << 20
#: Receive buffers posted to a net domain, each large enough for any frame (64 KiB
#: with its header), in whole pages.
RX_BUFFERS = 64
RX_BUFFER = 65536 + 4096
#: Net rings: transmit (frames out), receive (buffers the child fills).
NET_RINGS = ((256, 4 * MiB, 0), (RX_BUFFERS, RX_BUFFERS * RX_BUFFER, 0))
NET_TX = 0


class NetProxy(NetBackend):
    """A NetBackend whose frames go to and come from the driver domain behind `host`."""

    def __init__(self, host: DomainHost) -> None:
        self.host = host
        self.vnet_hdr = attribute(host.attributes, "vnet_hdr", bool, False)
        self.offload_features = attribute(host.attributes, "offload_features", int, 0)
        self._tx, self._rx = host.channel.rings
        self._features: int | None = None
        #: Frames refused because the transmit ring or its bounce area was full.
        self.tx_full = 0
        #: Queue pairs' workers and the event loop publish on the one transmit ring.
        self._tx_lock = threading.Lock()
        for index in range(RX_BUFFERS):
            self._post(index)
        self._rx.kick()

    def _post(self, index: int) -> None:
        gpa = self._rx.bounce_gpa(index * RX_BUFFER)
        self._rx.ring.add([(gpa, RX_BUFFER, WRITE)], index)

    def transmit(self, frames: list[Sequence[memoryview]]) -> int:
        """Publish the frames (those that fit the ring and its bounce area), kick once."""
        if self.host.failure is not None:
            raise OSError(errno.EIO, self.host.failure)
        with self._tx_lock:
            self._collect_tx()
            features = self._features
            if features is not None and not self._publish_tx(Op.SET_FEATURES, features):
                raise OSError(errno.ENOBUFS, "driver domain transmit ring full")
            self._features = None
            sent = 0
            for frame in frames:
                if not self._publish_tx(Op.TRANSMIT, frame_len(frame), frame):
                    break
                sent += 1
            if sent or features is not None:
                self._tx.kick()
        self.tx_full += len(frames) - sent
        return len(frames) - sent

    def set_features(self, features: int) -> None:
        self.host.set_state("features", features)
        with self._tx_lock:
            self._collect_tx()
            if self._publish_tx(Op.SET_FEATURES, features):
                self._features = None
                self._tx.kick()
            else:
                self._features = features  # sent before the next frame

    def _publish_tx(self, op: Op, arg: int, frame: Sequence[memoryview] = ()) -> bool:
        ring = self._tx
        driver = ring.ring
        if driver.free < 3:
            return False
        pieces: list[tuple[int, int]] = []
        end = 0
        if frame:
            got = ring.arena.alloc(arg)
            if got is None:
                return False
            pieces, end = got
            copy_views([ring.bounce[o : o + n] for o, n in pieces], frame)
        first, _ = ring.request(driver.next_head(), op, 0, arg, arg)
        driver.add([first, *((ring.bounce_gpa(o), n, 0) for o, n in pieces)], end)
        return True

    def _collect_tx(self) -> None:
        ring = self._tx
        with ring.lock:
            try:
                while (entry := ring.ring.take_used()) is not None:
                    end = entry[0]
                    assert isinstance(end, int)
                    if end:
                        ring.arena.release(end)
            except ChannelError as exc:
                self.host.kill(str(exc))

    def fileno(self, pair: int = 0) -> int | None:
        """The receive ring's call eventfd: readable when the child delivered frames
        (all of them reach queue pair 0)."""
        return self._rx.call_fd if pair == 0 else None

    def receive_into(self, buffers: Sequence[memoryview], pair: int = 0) -> int:
        ring = self._rx
        entry = self._take_rx()
        if entry is None:
            ring.clear_call()
            entry = self._take_rx()  # a frame may have come after the last look
            if entry is None:
                raise BlockingIOError
        index, written = entry
        assert isinstance(index, int)
        size = min(written, RX_BUFFER)
        start = index * RX_BUFFER
        src = ring.bounce[start : start + size]
        done = 0
        for view in buffers:
            n = min(view.nbytes, size - done)
            view[:n] = src[done : done + n]
            done += n
            if done == size:
                break
        self._post(index)
        ring.kick()
        return size

    def _take_rx(self) -> tuple[object, int] | None:
        if self.host.failure is not None:
            return None
        with self._rx.lock:
            try:
                return self._rx.ring.take_used()
            except ChannelError as exc:
                self.host.kill(str(exc))
                return None

    def stats(self) -> dict[str, int]:
        return {**self.host.stats(), "domain_tx_full": self.tx_full}

    def close(self) -> None:
        self.host.close()
