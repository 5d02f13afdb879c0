"""A virtio entropy device (virtio-rng, device id 4) as a vdev plugin.

The whole device: one queue; the driver posts writable buffers, the device fills them
with random bytes. Installed, it is `vdev run rng --socket PATH`; QEMU attaches it with
`-chardev socket,id=rng0,path=PATH -device vhost-user-rng-pci,chardev=rng0`.
"""

from __future__ import annotations

import os

from vdev.backend import int_option
from vdev.devices.base import Device, Queue


class RngDevice(Device):
    """virtio-rng: fills every writable buffer it is given with os.urandom bytes."""

    device_id = 4

    def __init__(self, *, max_queue_size: int | str = 1024) -> None:
        size = int_option("max_queue_size", max_queue_size, 1, 32768)
        super().__init__(num_queues=1, max_queue_size=size)
        self.bytes_served = 0

    def handle(self, queue: Queue) -> None:
        while (chain := queue.pop()) is not None:
            written = chain.write_into(os.urandom(chain.writable_len))
            self.bytes_served += written
            queue.push(chain, written)
        queue.notify()

    def stats(self) -> dict[str, int]:
        return {"bytes_served": self.bytes_served}
