"""The virtio data plane: guest memory, split and packed virtqueues, descriptor chains.

Nothing here is async or touches a socket: it works on any writable buffer (an mmap of
the front-end's memfd in production, a bytearray in tests).
"""

from vdev.virtio.chain import DescriptorChain
from vdev.virtio.errors import DescriptorError, GuestMemoryError, VirtioError
from vdev.virtio.features import TRANSPORT_FEATURES, VirtioFeature
from vdev.virtio.memory import GuestMemory, MemoryRegion
from vdev.virtio.queue import PackedQueue, SplitQueue, Virtqueue, make_queue

__all__ = [
    "TRANSPORT_FEATURES",
    "DescriptorChain",
    "DescriptorError",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryRegion",
    "PackedQueue",
    "SplitQueue",
    "VirtioError",
    "VirtioFeature",
    "Virtqueue",
    "make_queue",
]
