"""Block benchmarks: fio workloads in the guest, and the ways to serve it a disk.

Workloads are the four classic ones (CrystalDiskMark's set, at queue depths that suit
a small guest): 4 KiB random reads at QD1 (latency) and QD32 (IOPS), 1 MiB sequential
reads and writes at QD8 (bandwidth). Every run uses O_DIRECT in the guest (fio
--direct=1, libaio) and, where the host file system allows, on the host too.

Targets serve the same image file: vdev's `file` backend in its own daemon process,
qemu-storage-daemon's vhost-user-blk export (the C reference), and QEMU's built-in
virtio-blk (no vhost-user hop at all).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from vdev.bench.core import (
    VALUE,
    BenchContext,
    BenchError,
    BenchSettings,
    Setup,
    Target,
    Workload,
    daemon,
)
from vdev.qemu import render_args

log = logging.getLogger(__name__)

MiB = 1 << 20
QSD_BINARY = "qemu-storage-daemon"
QSD_PACKAGE = "qemu-utils"
#: How long a daemon gets to create its socket, and to exit after SIGTERM.
_PATTERN_CHUNK = 4 * MiB


@dataclass(frozen=True)
class FioWorkload(Workload):
    """One fio job on /dev/vda in the guest."""

    rw: str = "randread"
    bs: str = "4k"
    iodepth: int = 1
    #: Also report completion latency percentiles (p50, p99) in microseconds.
    latency: bool = False
    binaries: tuple[str, ...] = ("fio",)

    def script(self, settings: BenchSettings) -> str:
        out = f"/tmp/{self.name}"
        fio = [
            "fio", f"--name={self.name}", "--filename=/dev/vda", "--direct=1",
            "--ioengine=libaio", f"--rw={self.rw}", f"--bs={self.bs}",
            f"--iodepth={self.iodepth}", f"--size={settings.size}", "--time_based",
            f"--runtime={round(settings.runtime * 1000)}ms",
            f"--ramp_time={round(settings.ramp * 1000)}ms", "--percentile_list=50:99",
            "--eta=never", "--output-format=json", f"--output={out}.json",
        ]  # fmt: skip
        return f"{' '.join(fio)} > {out}.log 2>&1 && cat {out}.json || {{ cat {out}.log; false; }}"

    def parse(self, output: str) -> dict[str, float]:
        try:
            (job,) = json.loads(output)["jobs"]
            side = job["write" if "write" in self.rw else "read"]
            figures = {"iops": side["iops"], "mib_s": side["bw_bytes"] / MiB}
            if self.latency:
                percentiles = side["clat_ns"]["percentile"]
                figures["p50_us"] = percentiles["50.000000"] / 1000
                figures["p99_us"] = percentiles["99.000000"] / 1000
        except (ValueError, KeyError, TypeError) as exc:
            detail = f"{self.name}: unexpected fio output ({exc!r}):\n{output[-2000:]}"
            raise BenchError(detail) from None
        if job.get("error"):
            raise BenchError(f"{self.name}: fio reports error {job['error']}")
        figures[VALUE] = figures["iops" if self.unit == "IOPS" else "mib_s"]
        return figures


WORKLOADS: list[Workload] = [
    FioWorkload(
        "randread-4k-qd1", "4 KiB random read, QD1", "blk", "IOPS",
        extras=(("p50_us", "latency p50 (us)"), ("p99_us", "latency p99 (us)")),
        rw="randread", bs="4k", iodepth=1, latency=True,
    ),
    FioWorkload(
        "randread-4k-qd32", "4 KiB random read, QD32", "blk", "IOPS",
        rw="randread", bs="4k", iodepth=32,
    ),
    FioWorkload(
        "read-1m-qd8", "1 MiB sequential read, QD8", "blk", "MiB/s",
        rw="read", bs="1M", iodepth=8,
    ),
    FioWorkload(
        "write-1m-qd8", "1 MiB sequential write, QD8", "blk", "MiB/s",
        rw="write", bs="1M", iodepth=8,
    ),
]  # fmt: skip


# --- the shared image ---------------------------------------------------------------------


def supports_o_direct(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def prepare_image(directory: Path, settings: BenchSettings) -> tuple[Path, bool]:
    """A fully written image of `settings.size` bytes (reads must hit real blocks, not
    holes), out of the host page cache; and whether O_DIRECT works on it."""
    path = directory / "disk.img"
    chunk = os.urandom(_PATTERN_CHUNK)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, settings.size, len(chunk)):
            os.pwrite(fd, chunk[: settings.size - offset], offset)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    direct = supports_o_direct(path)
    if not direct:
        log.warning("%s does not support O_DIRECT: every target uses the host page cache", path)
    return path, direct


# --- targets ------------------------------------------------------------------------------


def _blk_args(sock: Path) -> list[str]:
    return render_args("vdev-blk", id="disk0", socket=sock, queues=1)


def vdev_file(*daemon_args: str) -> Setup:
    """vdev's file backend served by a `vdev run` daemon; `daemon_args` are extra
    options such as ``--domain driver``."""

    @asynccontextmanager
    async def setup(ctx: BenchContext) -> AsyncIterator[list[str]]:
        sock = ctx.workdir / "vdev.sock"
        argv = [sys.executable, "-m", "vdev.cli", "-q", "run", "blk", "--socket", str(sock)]
        argv += ["--backend", "file", "--path", str(ctx.image), *daemon_args]
        if ctx.direct:
            argv.append("--direct")
        async with daemon(argv, sock, ctx.workdir / "vdev.log"):
            yield _blk_args(sock)

    return setup


def _qsd_value(value: object) -> str:
    return str(value).replace(",", ",,")


@asynccontextmanager
async def qemu_storage_daemon(ctx: BenchContext) -> AsyncIterator[list[str]]:
    """qemu-storage-daemon exporting the image as vhost-user-blk (QEMU's C back-end)."""
    binary = shutil.which(QSD_BINARY)
    if binary is None:
        raise BenchError(f"{QSD_BINARY} not found: install the Debian package {QSD_PACKAGE}")
    sock = ctx.workdir / "qsd.sock"
    direct = "on" if ctx.direct else "off"
    aio = ctx.settings.qsd_aio
    argv = [
        binary,
        "--blockdev",
        f"driver=file,node-name=disk,filename={_qsd_value(ctx.image)},"
        f"cache.direct={direct},aio={aio}",
        "--export",
        "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,"
        f"addr.path={_qsd_value(sock)},writable=on",
    ]
    async with daemon(argv, sock, ctx.workdir / "qsd.log"):
        yield _blk_args(sock)


@asynccontextmanager
async def builtin(ctx: BenchContext) -> AsyncIterator[list[str]]:
    """QEMU's own virtio-blk on the image (builtin-blk template, aio=threads)."""
    yield render_args("builtin-blk", id="disk0", path=ctx.image, queues=1, direct=ctx.direct)


TARGETS: list[Target] = [
    Target("vdev", "vdev, file backend, in-process", "blk", vdev_file()),
    Target("qsd", "qemu-storage-daemon vhost-user-blk", "blk", qemu_storage_daemon, reference=True),
    Target("builtin", "QEMU built-in virtio-blk", "blk", builtin),
    Target(
        "driver-map",
        "vdev, file backend, driver domain (map)",
        "blk",
        vdev_file("--domain", "driver", "--domain-memory", "map"),
    ),
    Target(
        "driver-copy",
        "vdev, file backend, driver domain (copy)",
        "blk",
        vdev_file("--domain", "driver", "--domain-memory", "copy"),
    ),
]
