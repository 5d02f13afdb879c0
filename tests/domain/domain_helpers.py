"""Helpers of the driver-domain tests: devices in a driver domain, requests, waiting."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from vdev.config import DeviceSpec, build_device
from vdev.devices.blk import REQUEST_HEADER, SEGMENT, BlkDevice
from vdev.domain.host import DomainHost
from vdev.domain.proxy import BlockProxy
from vdev.domain.spec import DomainSpec
from vdev.testing.driver_rings import UsedBuffer
from vdev.testing.frontend import FrontendQueue

SECTOR = 512
IMAGE_SIZE = 8 << 20


def header(kind: int, sector: int = 0) -> bytes:
    return REQUEST_HEADER.pack(kind, 0, sector)


def segments(*segs: tuple[int, int, int]) -> bytes:
    """Discard / write-zeroes payload from (sector, num_sectors, flags) triples."""
    return b"".join(SEGMENT.pack(*s) for s in segs)


def status(used: UsedBuffer) -> int:
    return used.last_byte


def blk_in_domain(socket: Path, backend: str, options: dict[str, Any], **domain: Any) -> BlkDevice:
    """A virtio-blk device built as `vdev run --domain driver ...` builds it."""
    spec = DeviceSpec("blk", socket, backend, options, domain=DomainSpec("driver", **domain))
    device = build_device(spec)
    assert isinstance(device, BlkDevice) and isinstance(device.backend, BlockProxy)
    return device


def host_of(device: Any) -> DomainHost:
    host = device.backend.host
    assert isinstance(host, DomainHost)
    return host


def kill_child(host: DomainHost) -> int:
    pid = host.pid
    assert pid is not None, "no child is serving"
    os.kill(pid, signal.SIGKILL)
    return pid


async def transact(queue: FrontendQueue, readable: list[bytes], writable: list[int]) -> UsedBuffer:
    with trio.fail_after(20):
        return await queue.transact(readable, writable)


async def wait_until(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict."""
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(re.findall(r"^(\w+):[ \t]*(.*)$", text, re.MULTILINE))
