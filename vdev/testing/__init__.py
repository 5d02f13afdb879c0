"""Helpers for testing vdev devices and backends: a Python front-end, fake memory, real guests."""
