"""vdev: userspace virtio device backends over vhost-user."""

__version__ = "0.1.0"
