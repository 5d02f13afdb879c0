"""Where a backend runs: in the vdev process or in a separate driver domain."""
