"""Device models: virtio-blk, virtio-net, and the base class for raw devices."""
