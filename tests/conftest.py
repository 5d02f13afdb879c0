"""Shared by the whole suite. The fixtures and markers (vdev_frontend, vdev_daemon,
vdev_guest, requires_qemu...) come from vdev's own pytest plugin,
`vdev.testing.pytest_plugin`, loaded through its entry point as in any project."""

pytest_plugins = ["pytester"]  # tests/core/test_pytest_plugin.py runs pytest inside pytest
