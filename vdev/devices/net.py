"""virtio-net (virtio 1.2, section 5.1): Ethernet frames between a guest and a NetBackend.

Queues are rx0, tx0, rx1, tx1, ... (the front-end keeps the control queue to itself,
as QEMU and DPDK's virtio-user do for vhost-user net). Every frame in either direction
starts with a virtio_net_hdr (12 bytes, or 10 for a legacy driver without MRG_RXBUF).
The device strips that header before handing a frame to the backend and writes a
neutral one in front of received frames, unless the backend sets `vnet_hdr` (a TAP
opened with IFF_VNET_HDR): then the header travels untouched and the checksum and
segmentation offloads the backend supports are offered to the driver.

Each queue pair is served by one worker thread (`vdev.worker`). Transmit: a batch of
chains becomes one `transmit(frames)` call; a frame larger than the negotiated features
allow is dropped before anything is copied. Receive: the queue pools every buffer the
driver posts; frames the backend gives to `deliver` (from any thread) wait in a bounded
backlog per receive queue, and a backend with `fileno(pair)` is read straight into the
guest's buffers (zero copy), each pair from its own fd, but only once room for the
largest frame it may hand us is pooled (so no frame is taken and then dropped). Without
buffers the queue sleeps until the driver kicks. A frame too large for the guest's
buffers is dropped and counted, never truncated.
"""

from __future__ import annotations

import logging
import struct
import threading
import zlib
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag, auto
from typing import ClassVar

import trio

from vdev.backend import NetBackend, bool_option, int_option
from vdev.devices.base import Device, DeviceError, Queue
from vdev.net import (
    ETH_HLEN,
    MAX_FRAME,
    NET_HDR,
    NUM_BUFFERS,
    VLAN_HLEN,
    GsoType,
    HdrFlag,
    NetFeature,
    format_mac,
    frame_len,
    parse_mac,
    vnet_hdr_len,
)
from vdev.protocol.constants import ProtocolFeature, Request
from vdev.virtio.chain import DescriptorChain

log = logging.getLogger(__name__)


#: The offloads a `vnet_hdr` backend may declare in `offload_features`.
OFFLOAD_FEATURES = (
    NetFeature.CSUM
    | NetFeature.GUEST_CSUM
    | NetFeature.GUEST_TSO4
    | NetFeature.GUEST_TSO6
    | NetFeature.GUEST_ECN
    | NetFeature.GUEST_UFO
    | NetFeature.HOST_TSO4
    | NetFeature.HOST_TSO6
    | NetFeature.HOST_ECN
    | NetFeature.HOST_UFO
)
#: Offloads that hand the driver frames larger than the MTU.
GUEST_GSO = NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6 | NetFeature.GUEST_UFO
#: Offloads that let the driver send frames larger than the MTU.
HOST_GSO = NetFeature.HOST_TSO4 | NetFeature.HOST_TSO6 | NetFeature.HOST_UFO


class NetStatus(IntFlag):
    """`status` field of the configuration space."""

    LINK_UP = 1
    ANNOUNCE = 2


# Plain ints for the per-frame path (IntFlag arithmetic costs a call each time).
_NEEDS_CSUM = int(HdrFlag.NEEDS_CSUM)
_GSO_NONE = int(GsoType.NONE)

#: Where num_buffers sits in struct virtio_net_hdr.
NUM_BUFFERS_OFFSET = 10
#: struct virtio_net_config up to mtu: mac, status, max_virtqueue_pairs, mtu.
NET_CONFIG = struct.Struct("<6sHHH")

DEFAULT_MTU = 1500
MIN_MTU = 68
#: Frames placed per pass over a receive queue (then the driver is notified).
RX_BATCH = 256
#: Chains taken from a transmit ring per pass.
TX_BATCH = 256
#: More chains than any ring has: a receive queue pools all the driver offers.
POOL_MAX = 0x8000


def consistent_offloads(features: int) -> int:
    """`features` minus any offload whose prerequisite (virtio 1.2, 5.1.3.1) is missing."""
    drop = 0
    if not features & NetFeature.GUEST_CSUM:
        drop |= GUEST_GSO | NetFeature.GUEST_ECN
    if not features & (NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6):
        drop |= NetFeature.GUEST_ECN
    if not features & NetFeature.CSUM:
        drop |= NetFeature.HOST_TSO4 | NetFeature.HOST_TSO6 | NetFeature.HOST_UFO
        drop |= NetFeature.HOST_ECN
    if not features & (NetFeature.HOST_TSO4 | NetFeature.HOST_TSO6):
        drop |= NetFeature.HOST_ECN
    # int(): inverting an IntFlag would also clear every bit outside NetFeature.
    return features & ~int(drop)


def rarp_announce(mac: bytes) -> bytes:
    """The RARP "reverse request" frame QEMU broadcasts to announce `mac` after migration."""
    eth = b"\xff" * 6 + mac + b"\x80\x35"
    rarp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return (eth + rarp).ljust(60, b"\0")


def flow_hash(frame: bytes | memoryview) -> int:
    """A hash of the IP addresses and L4 ports of `frame`, 0 for non-IP frames."""
    if len(frame) < ETH_HLEN:
        return 0
    ethertype = frame[12] << 8 | frame[13]
    if ethertype == 0x0800:  # IPv4: addresses and the first 4 bytes after a 20-byte header
        return zlib.crc32(memoryview(frame)[26:38])
    if ethertype == 0x86DD:  # IPv6: addresses
        return zlib.crc32(memoryview(frame)[22:54])
    return 0


def _skip(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """`views` without their first `n` bytes."""
    first = views[0]
    if first.nbytes > n:
        return [first[n:], *views[1:]] if n else list(views)
    out: list[memoryview] = []
    for view in views:
        if n >= view.nbytes:
            n -= view.nbytes
        else:
            out.append(view[n:] if n else view)
            n = 0
    return out


class _Rx(IntEnum):
    """Outcome of placing one frame into a receive queue."""

    PLACED = auto()
    DROPPED = auto()
    STARVED = auto()  # not enough guest buffers: wait for a kick
    EMPTY = auto()  # the backend fd has no frame


@dataclass(slots=True)
class _Counters:
    frames: int = 0
    bytes: int = 0


@dataclass(slots=True, eq=False)
class _RxQueue:
    """State of one receive queue (used on its worker thread, `frames` from any)."""

    pair: int
    #: Frames delivered by the backend (from any thread), waiting for guest buffers.
    frames: deque[bytes | bytearray] = field(default_factory=deque)
    counters: _Counters = field(default_factory=_Counters)
    #: Set while the queue runs.
    queue: Queue | None = None
    #: The backend fd this queue reads (`fileno(pair)`), if any.
    fd: int | None = None
    #: Every chain the driver made available and no frame used yet, with its size: the
    #: worker sleeps only once the ring has nothing it has not taken.
    pool: deque[tuple[DescriptorChain, int]] = field(default_factory=deque)
    #: Bytes and ring descriptors the pooled chains hold.
    space: int = 0
    descs: int = 0
    #: The last pass found too few guest buffers: no frame is taken (not even from the
    #: fd, which is then not watched) until the driver posts more.
    starved: bool = False
    #: Catches the part of a backend frame beyond the buffers offered (fd path).
    overflow: memoryview | None = None


class NetDevice(Device):
    """A virtio-net device whose frames come from and go to a NetBackend."""

    device_id: ClassVar[int] = 1
    protocol_features: ClassVar[int] = ProtocolFeature.RARP | ProtocolFeature.NET_MTU

    def __init__(
        self,
        backend: NetBackend,
        *,
        queues: int | str = 1,
        mac: str | bytes | None = None,
        mtu: int | str | None = None,
        max_queue_size: int | str = 1024,
        rx_backlog: int | str = 256,
        mrg_rxbuf: bool | str = True,
        config_space: bool | str = False,
    ) -> None:
        pairs = int_option("queues", queues, 1, 0x8000)
        super().__init__(
            num_queues=2 * pairs,
            max_queue_size=int_option("max_queue_size", max_queue_size, 1, 0x8000),
        )
        self.backend = backend
        self.num_queue_pairs = pairs
        try:
            self.mac = None if mac is None else parse_mac(mac)
        except ValueError as exc:
            raise ValueError(f"mac: {exc}") from None
        self.mtu = None if mtu is None else int_option("mtu", mtu, MIN_MTU, 0xFFFF)
        self.rx_backlog = int_option("rx_backlog", rx_backlog, 1, 1 << 20)
        self.mrg_rxbuf = bool_option("mrg_rxbuf", mrg_rxbuf)
        self._config_space = bool_option("config_space", config_space)
        #: The `status` field's link bit (VIRTIO_NET_F_STATUS), set with `set_link`.
        self.link_up = True
        self._rx = [_RxQueue(pair) for pair in range(pairs)]
        self._tx = [_Counters() for _ in range(pairs)]
        #: Running receive queues (replaced whole, so other threads read a snapshot),
        #: and which of them each worker thread serves.
        self._active_rx: tuple[_RxQueue, ...] = ()
        self._rx_of_thread: dict[int, _RxQueue] = {}
        self._rx_lock = threading.Lock()
        self._drops: Counter[str] = Counter()
        self._rarp_sent = 0
        self._configure(0)
        backend.attach(self._deliver)
        for pair in range(pairs):  # a pair's fd is attached while its receive queue runs
            self._enable_backend_queue(pair, False)

    # --- negotiation -------------------------------------------------------------------

    def features(self) -> int:
        offered = NetFeature.STATUS
        if self.mrg_rxbuf:
            offered |= NetFeature.MRG_RXBUF
        if self.mac is not None:
            offered |= NetFeature.MAC
        if self.mtu is not None:
            offered |= NetFeature.MTU
        if self.num_queue_pairs > 1:
            offered |= NetFeature.MQ
        if self.backend.vnet_hdr:
            offered |= consistent_offloads(self.backend.offload_features & OFFLOAD_FEATURES)
        return int(offered)

    @property
    def config_space(self) -> bool:
        """Off by default: QEMU keeps a vhost-user NIC's config itself (MAC from its
        -device, link state from its netdev) and never acks CONFIG (7.2; later versions
        also warn). The `config_space` option offers CONFIG and BACKEND_REQ to
        front-ends that read it over vhost-user (and so see `set_link`)."""
        return self._config_space

    def config(self) -> bytes:
        status = NetStatus.LINK_UP if self.link_up else 0
        return NET_CONFIG.pack(self.mac or bytes(6), status, self.num_queue_pairs, self.mtu or 0)

    def set_link(self, up: bool) -> None:
        """Report the link up or down in the config space's `status` (the caller tells
        the front-end: `DeviceServer.set_link`)."""
        if up != self.link_up:
            log.info("link %s", "up" if up else "down")
        self.link_up = up

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self._configure(features)
        self.backend.set_features(features)

    def reset(self) -> None:
        super().reset()
        for rx in self._rx:
            rx.frames.clear()
        self._configure(0)

    def _configure(self, features: int) -> None:
        hdr_len = self._hdr_len = vnet_hdr_len(features)
        self._mrg = bool(features & NetFeature.MRG_RXBUF)
        self._vnet = self.backend.vnet_hdr
        link = (self.mtu or DEFAULT_MTU) + ETH_HLEN + VLAN_HLEN
        #: Largest frame the driver may send: 64 KiB with a segmentation offload, or
        #: without an MTU it promised to keep (VIRTIO_NET_F_MTU), else the MTU's.
        mtu_bound = features & NetFeature.MTU and not features & HOST_GSO
        self._tx_max = hdr_len + (link if mtu_bound else MAX_FRAME)
        #: Bytes of buffers gathered before a frame is taken from the backend fd: the
        #: largest frame the backend may hand us (64 KiB with the guest's GSO offloads),
        #: so that a frame read is never one without room.
        self._rx_need = hdr_len + (MAX_FRAME if features & GUEST_GSO else link)
        self._rx_hdr = bytearray(hdr_len)
        #: The header of a received frame in one buffer (num_buffers 1 where it exists).
        self._rx_hdr_single = bytes(hdr_len)
        if hdr_len == NET_HDR.size:
            self._rx_hdr_single = NET_HDR.pack(0, _GSO_NONE, 0, 0, 0, 0, 1)

    async def handle_message(self, request: int, payload: object) -> object:
        if request == Request.SEND_RARP:
            if not isinstance(payload, bytes) or len(payload) != 6:
                raise DeviceError(f"SEND_RARP: {payload!r} is not a MAC address")
            self._announce(payload)
            return None
        if request == Request.NET_SET_MTU:
            if not isinstance(payload, int) or not MIN_MTU <= payload <= 0xFFFF:
                raise DeviceError(f"NET_SET_MTU: MTU {payload} outside {MIN_MTU}..65535")
            if payload != self.mtu:
                log.info("front-end set the MTU to %d (was %s)", payload, self.mtu)
            self.mtu = payload
            self._configure(self.acked_features)
            try:
                await trio.to_thread.run_sync(self.backend.set_mtu, payload)
            except OSError as exc:
                msg = f"NET_SET_MTU: the backend cannot take MTU {payload}: {exc}"
                raise DeviceError(msg) from None
            return None
        return await super().handle_message(request, payload)

    def _announce(self, mac: bytes) -> None:
        frame = rarp_announce(mac)
        if self._vnet:
            frame = bytes(self._hdr_len) + frame
        try:
            self.backend.transmit([[memoryview(frame)]])
        except OSError as exc:
            log.warning("RARP announce of %s failed: %s", format_mac(mac), exc)
            return
        self._rarp_sent += 1
        log.info("announced %s (RARP)", format_mac(mac))

    # --- queues (on the pair's worker thread) ------------------------------------------

    def queue_group(self, index: int) -> int:
        """A thread per queue pair, whatever `queue_threads` says: a frame delivered on
        a pair's worker goes back to that pair (found by thread), so pairs never share."""
        return index // 2

    def start_queue(self, queue: Queue) -> None:
        pair, is_tx = divmod(queue.index, 2)
        if is_tx:
            return
        rx = self._rx[pair]
        rx.queue = queue
        rx.starved = False
        rx.fd = self.backend.fileno(pair)
        self._enable_backend_queue(pair, True)
        if rx.fd is not None and rx.overflow is None:
            rx.overflow = memoryview(bytearray(NET_HDR.size + MAX_FRAME + 1))
        with self._rx_lock:
            self._active_rx = (*self._active_rx, rx)
            self._rx_of_thread[threading.get_ident()] = rx

    def stop_queue(self, queue: Queue) -> None:
        pair, is_tx = divmod(queue.index, 2)
        rx = self._rx[pair]
        if is_tx or rx.queue is None:
            return
        with self._rx_lock:
            self._active_rx = tuple(r for r in self._active_rx if r is not rx)
            self._rx_of_thread.pop(threading.get_ident(), None)
        # Give back the buffers held for frames that never came (0 bytes written).
        while rx.pool:
            queue.fill(rx.pool.popleft()[0], 0)
        rx.space = rx.descs = 0
        queue.notify()
        rx.queue = None
        self._enable_backend_queue(pair, False)

    def _enable_backend_queue(self, pair: int, enabled: bool) -> None:
        try:
            self.backend.enable_queue(pair, enabled)
        except OSError as exc:
            log.warning(
                "pair %d: the backend cannot %s its queue: %s",
                pair,
                "attach" if enabled else "detach",
                exc,
            )

    def handle(self, queue: Queue) -> None:
        pair, is_tx = divmod(queue.index, 2)
        if is_tx:
            self._transmit(queue, self._tx[pair])
        else:
            self._receive(queue, self._rx[pair])

    def has_work(self, queue: Queue) -> bool:
        pair, is_tx = divmod(queue.index, 2)
        rx = self._rx[pair]
        return not is_tx and bool(rx.frames) and not rx.starved

    def wait_fds(self, queue: Queue) -> Sequence[int]:
        pair, is_tx = divmod(queue.index, 2)
        rx = self._rx[pair]
        if is_tx or rx.fd is None or rx.starved:
            return ()
        return (rx.fd,)

    # --- transmit ----------------------------------------------------------------------

    def _transmit(self, queue: Queue, counters: _Counters) -> None:
        """Hand a batch of the driver's frames to the backend, then complete them."""
        chains = queue.pop_batch(TX_BATCH)
        if not chains:
            return
        hdr_len = self._hdr_len
        vnet = self._vnet
        tx_max = self._tx_max
        frames: list[Sequence[memoryview]] = []
        size = 0
        for chain in chains:
            views = chain.readable
            length = frame_len(views) if views else 0
            if length > tx_max:  # counted before anything is copied or joined
                self._drops["tx_oversize"] += 1
            elif length < hdr_len:
                self._drops["tx_malformed"] += 1
            elif not vnet and self._tx_offload_requested(views):
                self._drops["tx_offload"] += 1
            else:
                frames.append(views if vnet else _skip(views, hdr_len))
                size += length - hdr_len
        if frames:
            try:
                dropped = self.backend.transmit(frames) or 0
            except OSError as exc:
                dropped = len(frames)
                log.debug("queue %d: backend transmit failed: %s", queue.index, exc)
            if dropped:
                self._drops["tx_backend_error"] += dropped
            counters.frames += len(frames) - dropped
            counters.bytes += size
        for chain in chains:  # only now may the driver reuse the buffers
            queue.fill(chain, 0)
        queue.notify()

    @staticmethod
    def _tx_offload_requested(views: list[memoryview]) -> bool:
        """True if the driver asked for an offload we never offered (checksum, GSO)."""
        head = views[0] if views[0].nbytes >= 2 else b"".join(views)
        return bool(head[0] & _NEEDS_CSUM or head[1] != _GSO_NONE)

    # --- receive -----------------------------------------------------------------------

    def _receive(self, queue: Queue, rx: _RxQueue) -> None:
        """Place delivered frames, then frames read from the backend fd, until either
        runs dry, the guest's buffers do or `RX_BATCH` is placed; publish, notify once."""
        self._refill(queue, rx)
        done = 0
        result = _Rx.EMPTY
        while done < RX_BATCH:
            if rx.frames:
                result = self._place(queue, rx, rx.frames[0])
                if result is not _Rx.STARVED:
                    rx.frames.popleft()
            elif rx.fd is not None:
                result = self._read(queue, rx)
            else:
                result = _Rx.EMPTY
            if result is _Rx.STARVED or result is _Rx.EMPTY:
                break
            done += 1
        rx.starved = result is _Rx.STARVED
        if done:
            queue.notify()

    def _refill(self, queue: Queue, rx: _RxQueue) -> bool:
        """Pool every chain the driver made available; False if there was none."""
        chains = queue.pop_batch(POOL_MAX)
        pool = rx.pool
        for chain in chains:
            views = chain.writable
            space = views[0].nbytes if len(views) == 1 else chain.writable_len
            pool.append((chain, space))
            rx.space += space
            rx.descs += chain.ndescs
        return bool(chains)

    def _reserve(self, queue: Queue, rx: _RxQueue, size: int) -> bool:
        """True if the pool holds room for `size` bytes (in its first chain without
        MRG_RXBUF), refilled from the ring if need be."""
        pool = rx.pool
        while True:
            if self._mrg:
                if rx.space >= size:
                    return True
            elif pool:
                return True
            if not self._refill(queue, rx):
                return False

    def _place(self, queue: Queue, rx: _RxQueue, frame: bytes | bytearray) -> _Rx:
        """Copy a delivered frame into the guest's buffers."""
        hdr_len = self._hdr_len
        size = len(frame) if self._vnet else hdr_len + len(frame)
        if size > hdr_len + MAX_FRAME or size < hdr_len:
            return self._drop_rx("rx_oversize" if size > hdr_len else "rx_malformed")
        pool = rx.pool
        if not pool and not self._refill(queue, rx):
            return _Rx.STARVED
        chain, space = pool[0]
        if not self._vnet and space >= size and chain.writable[0].nbytes >= size:
            # Fast path: header and frame in the first buffer of the next chain.
            first = chain.writable[0]
            first[:hdr_len] = self._rx_hdr_single
            first[hdr_len:size] = frame
            pool.popleft()
            rx.space -= space
            rx.descs -= chain.ndescs
            queue.fill(chain, size)
            rx.counters.frames += 1
            rx.counters.bytes += size - hdr_len
            return _Rx.PLACED
        if not self._reserve(queue, rx, size):
            return self._drop_rx("rx_no_buffers") if self._whole_ring(queue, rx) else _Rx.STARVED
        if size > (rx.space if self._mrg else pool[0][1]):  # the one chain is too small
            return self._drop_rx("rx_oversize")
        self._scatter(rx, frame, 0 if self._vnet else hdr_len)
        return self._commit(queue, rx, size)

    def _read(self, queue: Queue, rx: _RxQueue) -> _Rx:
        """Read one frame from the backend fd straight into the guest's buffers.

        Nothing is read before the pool holds room for the largest frame the backend
        may hand us (`_rx_need`), or the driver's whole ring if that is less: a frame
        taken from the fd is never one without buffers.
        """
        need = self._rx_need
        if not self._reserve(queue, rx, need) and not self._whole_ring(queue, rx):
            return _Rx.STARVED
        assert rx.overflow is not None
        offered = 0
        iov: list[memoryview] = []
        for chain, space in rx.pool:
            iov += chain.writable
            offered += space
            if offered >= need or not self._mrg:
                break
        if not self._vnet:
            iov = _skip(iov, self._hdr_len)
        iov.append(rx.overflow)
        try:
            n = self.backend.receive_into(iov, rx.pair)
        except BlockingIOError:
            return _Rx.EMPTY
        except OSError as exc:
            log.error("backend receive failed, no longer reading its fd: %s", exc)
            self._drops["rx_backend_error"] += 1
            rx.fd = None
            return _Rx.EMPTY
        size = n if self._vnet else self._hdr_len + n
        if size >= offered + rx.overflow.nbytes or size < self._hdr_len:
            return self._drop_rx("rx_oversize" if size > self._hdr_len else "rx_malformed")
        if size > offered:
            if not self._mrg:
                return self._drop_rx("rx_oversize")
            if not self._reserve(queue, rx, size):
                return self._drop_rx("rx_no_buffers")
            self._scatter(rx, rx.overflow[: size - offered], offered)
        return self._commit(queue, rx, size)

    @staticmethod
    def _whole_ring(queue: Queue, rx: _RxQueue) -> bool:
        """The pool holds every descriptor of the ring: the driver cannot post more."""
        return rx.descs >= queue.size

    def _drop_rx(self, reason: str) -> _Rx:
        self._drops[reason] += 1
        return _Rx.DROPPED

    @staticmethod
    def _scatter(rx: _RxQueue, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write `data` at byte `offset` of the pooled chains, taken end to end."""
        src = memoryview(data)
        done = 0
        for chain, space in rx.pool:
            if offset >= space:
                offset -= space
                continue
            done += chain.write_into(src[done:] if done else src, offset)
            offset = 0
            if done == src.nbytes:
                return

    def _commit(self, queue: Queue, rx: _RxQueue, size: int) -> _Rx:
        """Complete the pooled chains holding a `size`-byte frame (header included)."""
        count = 0
        covered = 0
        for _, space in rx.pool:
            count += 1
            covered += space
            if covered >= size:
                break
        first = rx.pool[0][0]
        if not self._vnet:
            if self._hdr_len == NET_HDR.size:
                NUM_BUFFERS.pack_into(self._rx_hdr, NUM_BUFFERS_OFFSET, count)
            first.write_into(self._rx_hdr)
        elif self._hdr_len == NET_HDR.size:
            first.write_into(NUM_BUFFERS.pack(count), NUM_BUFFERS_OFFSET)
        left = size
        for _ in range(count):
            chain, space = rx.pool.popleft()
            rx.space -= space
            rx.descs -= chain.ndescs
            written = min(space, left)
            queue.fill(chain, written)
            left -= written
        rx.counters.frames += 1
        rx.counters.bytes += size - self._hdr_len
        return _Rx.PLACED

    # --- frames from the backend -------------------------------------------------------

    def _deliver(self, frame: bytes | memoryview) -> bool:
        """The backend's DeliverFn (any thread): queue `frame` for a receive queue.

        A frame delivered on a pair's worker thread (an echo of what that pair sent)
        stays on that pair; others go where their flow hashes.
        """
        local = self._rx_of_thread.get(threading.get_ident())
        rx = local
        if rx is None:
            active = self._active_rx
            if not active:
                self._drops["rx_not_ready"] += 1
                return False
            rx = active[flow_hash(frame) % len(active)] if len(active) > 1 else active[0]
        if len(rx.frames) >= self.rx_backlog:
            self._drops["rx_backlog_full"] += 1
            return False
        rx.frames.append(bytes(frame) if isinstance(frame, memoryview) else frame)
        queue = rx.queue
        if local is None and queue is not None:  # its own worker is awake: no wake-up
            queue.wake()
        return True

    def close(self) -> None:
        self.backend.close()

    # --- counters ----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pair, (rx, tx) in enumerate(zip(self._rx, self._tx, strict=True)):
            out[f"rx{pair}_frames"] = rx.counters.frames
            out[f"rx{pair}_bytes"] = rx.counters.bytes
            out[f"tx{pair}_frames"] = tx.frames
            out[f"tx{pair}_bytes"] = tx.bytes
        out["rx_frames"] = sum(rx.counters.frames for rx in self._rx)
        out["rx_bytes"] = sum(rx.counters.bytes for rx in self._rx)
        out["tx_frames"] = sum(tx.frames for tx in self._tx)
        out["tx_bytes"] = sum(tx.bytes for tx in self._tx)
        drops = sorted(self._drops.items())  # one C call: safe while workers add reasons
        out["drops"] = sum(n for _, n in drops)
        out.update({f"drop_{reason}": n for reason, n in drops})
        out["rarp_sent"] = self._rarp_sent
        return out

    def queue_stats(self, index: int) -> dict[str, int]:
        """Frames (as requests) and bytes of a receive (even) or transmit (odd) queue."""
        pair, transmit = divmod(index, 2)
        counters = self._tx[pair] if transmit else self._rx[pair].counters
        return {"requests": counters.frames, "bytes": counters.bytes}
