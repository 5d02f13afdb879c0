"""Virtqueues: the common interface, both layouts, and a factory for vhost-user setups."""

from __future__ import annotations

from vdev.virtio.features import VirtioFeature
from vdev.virtio.inflight import PackedInflight, SplitInflight
from vdev.virtio.layout import packed_ring_sizes, split_ring_sizes
from vdev.virtio.memory import GuestMemory
from vdev.virtio.packed import PACKED_INITIAL_BASE, PackedQueue
from vdev.virtio.ring import Virtqueue
from vdev.virtio.split import SplitQueue

__all__ = [
    "PACKED_INITIAL_BASE",
    "PackedQueue",
    "SplitQueue",
    "Virtqueue",
    "initial_base",
    "make_queue",
]


def initial_base(features: int) -> int:
    """The ring state of a fresh queue, for a front-end that sends no SET_VRING_BASE."""
    return PACKED_INITIAL_BASE if features & VirtioFeature.RING_PACKED else 0


def make_queue(
    mem: GuestMemory,
    index: int,
    size: int,
    desc_addr: int,
    avail_addr: int,
    used_addr: int,
    *,
    features: int,
    base: int,
    inflight: memoryview | None = None,
) -> Virtqueue:
    """Build the queue the front-end described (SET_VRING_NUM/ADDR/BASE).

    Addresses are front-end user addresses, as in SET_VRING_ADDR; with RING_PACKED
    acked, `avail_addr`/`used_addr` are the driver/device event suppression areas.
    `inflight` is the queue's region of an in-flight buffer (INFLIGHT_SHMFD), if any.
    Raises `GuestMemoryError` if an area is not inside one mapped region, `VirtioError`
    for an invalid size or base.
    """
    packed = bool(features & VirtioFeature.RING_PACKED)
    desc_len, avail_len, used_len = (packed_ring_sizes if packed else split_ring_sizes)(size)
    areas = (
        mem.vva_view(desc_addr, desc_len),
        mem.vva_view(avail_addr, avail_len),
        mem.vva_view(used_addr, used_len),
    )
    if packed:
        tracker = None if inflight is None else PackedInflight(inflight, size)
        return PackedQueue(mem, index, size, *areas, features=features, base=base, inflight=tracker)
    split = None if inflight is None else SplitInflight(inflight, size)
    return SplitQueue(mem, index, size, *areas, features=features, base=base, inflight=split)
