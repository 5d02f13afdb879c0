"""Third-party backends for the driver-domain tests, registered through a test-made
distribution's entry points (see `install_plugins`): the child loads them by name, as
it would any plugin."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from vdev_backends.blk_file import FileBackend

from vdev.devices.base import Device

DIST = "vdev_domain_test_plugins-0.dist-info"
ENTRY_POINTS = """\
[vdev.devices]
quiet = domain_plugins:QuietDevice

[vdev.blk_backends]
crashy = domain_plugins:CrashyDisk
spawning = domain_plugins:SpawningDisk
barrier = domain_plugins:BarrierDisk
socket = domain_plugins:SocketDisk
"""


class QuietDevice(Device):
    """A raw device with no backend (and no queue traffic)."""

    device_id = 4


class CrashyDisk(FileBackend):
    """A file disk whose constructor aborts the process while `crash_flag` exists."""

    def __init__(self, path: str, crash_flag: str = "") -> None:
        if crash_flag and os.path.exists(crash_flag):
            os.abort()
        super().__init__(path)


class SpawningDisk(FileBackend):
    """A file disk that runs a program on every flush (which seccomp must refuse)."""

    def flush(self) -> None:
        subprocess.run(["true"], check=True)
        super().flush()


class SocketDisk(FileBackend):
    """A file disk whose flush tries to create sockets (which seccomp must refuse for a
    block backend) and writes what happened into the image's first sector."""

    def flush(self) -> None:
        outcome = []
        for create in (lambda: socket.socket(socket.AF_UNIX), socket.socketpair):
            try:
                created = create()
            except OSError as exc:
                outcome.append(f"errno {exc.errno}")
            else:
                outcome.append("created")
                for sock in created if isinstance(created, tuple) else (created,):
                    sock.close()
        self.write(0, [memoryview(", ".join(outcome).encode().ljust(512))])
        super().flush()


class BarrierDisk(FileBackend):
    """A file disk whose reads each wait until three are in progress at once."""

    max_concurrency = 3

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._barrier = threading.Barrier(self.max_concurrency, timeout=10)

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._barrier.wait()
        super().read(offset, buffers)


def install_plugins(directory: Path) -> None:
    """Write the distribution metadata that makes these backends installed plugins."""
    dist = directory / DIST
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vdev-domain-test-plugins\nVersion: 0\n"
    )
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
