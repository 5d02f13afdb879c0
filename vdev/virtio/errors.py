"""Exceptions of the virtio data plane."""

from __future__ import annotations


class VirtioError(Exception):
    """Base class for errors of the virtio data plane (bad ring setup, bad guest data)."""


class GuestMemoryError(VirtioError):
    """An address or length outside the guest memory the front-end mapped for us."""


class DescriptorError(VirtioError):
    """The driver put a malformed or hostile descriptor chain on a queue.

    Raised by `Virtqueue.pop`; the queue is then marked broken and yields nothing more.
    Other queues, and the daemon, are unaffected: it is the driver's fault.
    """
