"""vdev's built-in backends (imported as vdev_backends, registered via entry points)."""
