"""`vdev demo`: boot a real Linux guest on vdev devices and show what happened.

Every entry of `DEMO_DEVICES` contributes one device: it is served in this process on
a socket of its own, attached to the guest with its QEMU arguments, and exercised by
its fragment of the guest's script. The report gives each fragment's output, the
device's request counters, host-side checks, and how long each part took. To add a
device to the demo, append a factory to `DEMO_DEVICES`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from vdev import netsetup
from vdev.config import DeviceSpec, build_device
from vdev.devices.base import Device
from vdev.qemu import USERSPACE_MARKER, choose_accel, render_args
from vdev.server import DeviceServer
from vdev.testing.guest import GuestImage, GuestResult, build_guest, start_guest
from vdev.trioutil import unwrap_single

log = logging.getLogger(__name__)

MiB = 1 << 20
DISK_SIZE = 64 * MiB
#: Printed by the guest before each device's fragment (followed by the device's name).
SECTION = "=== vdev-demo:"
GUEST_MEM = "512M"


class DemoError(RuntimeError):
    """The demo could not run, or the guest or the host found something wrong."""


@dataclass(frozen=True)
class DemoOptions:
    """What `vdev demo` was asked for."""

    keep_image: Path | None = None
    accel: str = "auto"
    timeout: float = 300.0


@dataclass
class DemoDevice:
    """One device of the demo: what to serve, how QEMU attaches it, what the guest does.

    `script` is a shell fragment run under ``set -e`` in the guest; it fails the demo by
    failing. `summary` turns the device's `stats()` into report lines; `check` runs on
    the host after the guest has powered off and returns report lines (raising
    `DemoError` if something is wrong).
    """

    name: str
    title: str
    device: Device
    socket: Path
    qemu_args: list[str]
    script: str
    extra_binaries: tuple[str, ...] = ()
    extra_modules: tuple[str, ...] = ()
    summary: Callable[[dict[str, int]], list[str]] = lambda stats: [
        ", ".join(f"{k} {v}" for k, v in stats.items() if v)
    ]
    check: Callable[[], list[str]] = list


#: A demo device's factory: given a private work directory and the options, an async
#: context manager that yields the device ready to serve and cleans up after it.
DemoFactory = Callable[[Path, DemoOptions], AbstractAsyncContextManager[DemoDevice]]


# --- the disk ---------------------------------------------------------------------------

_DISK_SCRIPT = """
echo "/dev/vda: $(cat /sys/block/vda/size) sectors of 512 bytes"
echo "serial number: $(cat /sys/block/vda/serial)"
mkfs.ext4 -q -L vdev-demo /dev/vda
echo "made an ext4 file system on it"
mkdir -p /mnt/disk
mount -t ext4 /dev/vda /mnt/disk
i=0
while [ $i -lt {files} ]; do
    head -c 1048576 /dev/urandom > /mnt/disk/data$i
    i=$((i + 1))
done
echo "{greeting}" > /mnt/disk/hello.txt
(cd /mnt/disk && sha256sum data* > /tmp/disk.sums)
umount /mnt/disk
echo "wrote {files} files of 1 MiB of random bytes and hello.txt, unmounted"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt/disk
(cd /mnt/disk && sha256sum -c /tmp/disk.sums > /dev/null)
echo "mounted again: all {files} files read back from the disk match their checksums"
echo "hello.txt says: $(cat /mnt/disk/hello.txt)"
df -k /mnt/disk | awk 'NR == 2 {{print "file system: " $3 " KiB used of " $2 " KiB"}}'
umount /mnt/disk
"""
_GREETING = "hello from the guest, written through vdev"
_FILES = 16
_REQUEST_KINDS = ("in", "out", "flush", "discard", "write_zeroes", "get_id")


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def _blk_summary(stats: dict[str, int]) -> list[str]:
    kinds = ", ".join(
        f"{kind} {stats[f'{kind}_requests']}"
        for kind in _REQUEST_KINDS
        if stats.get(f"{kind}_requests")
    )
    return [
        f"requests: {stats['requests']} ({kinds}); errors {stats['errors']}",
        f"moved: {_mib(stats['bytes_read'])} read, {_mib(stats['bytes_written'])} written",
    ]


def _read_back(image: Path) -> list[str]:
    """The guest's hello.txt, read on the host straight out of the image."""
    debugfs = shutil.which("debugfs", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if debugfs is None:
        return ["host: debugfs (e2fsprogs) not installed: image not inspected"]
    done = subprocess.run(
        [debugfs, "-R", "cat /hello.txt", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    text = done.stdout.strip()
    if done.returncode != 0 or text != _GREETING:
        raise DemoError(f"hello.txt in the image reads {text!r}: {done.stderr.strip()}")
    return [f"host: debugfs reads hello.txt out of {image.name}: {text!r}"]


@asynccontextmanager
async def disk(workdir: Path, options: DemoOptions) -> AsyncIterator[DemoDevice]:
    """A virtio-blk disk: an empty image on the file backend, formatted by the guest."""
    image = workdir / "disk.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    sock = workdir / "disk.sock"
    spec = DeviceSpec("blk", sock, "file", {"path": str(image), "serial": "vdev-demo-disk"})
    device = build_device(spec)
    try:
        yield DemoDevice(
            name="disk",
            title=f"virtio-blk, file backend, {DISK_SIZE // MiB} MiB image",
            device=device,
            socket=sock,
            qemu_args=render_args("vdev-blk", id="disk0", socket=sock, queues=1),
            script=_DISK_SCRIPT.format(files=_FILES, greeting=_GREETING),
            extra_binaries=("mkfs.ext4",),
            extra_modules=("crc32c_generic", "ext4"),
            summary=_blk_summary,
            check=lambda: _read_back(image),
        )
    finally:
        device.close()
        if options.keep_image is not None:
            shutil.move(image, options.keep_image)
            log.info("disk image kept at %s", options.keep_image)


# --- the NIC ----------------------------------------------------------------------------

_HOST_ADDRESS = "10.0.2.2/24"
_NIC_SCRIPT = """
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
echo "eth0 $(cat /sys/class/net/eth0/address): 10.0.2.15/24; the host side is 10.0.2.2"
n=0
until ping -c 1 -W 1 10.0.2.2 > /dev/null 2>&1; do n=$((n + 1)); [ $n -lt 30 ]; done
ping -c 5 -A 10.0.2.2 | tail -2
"""


def _net_summary(stats: dict[str, int]) -> list[str]:
    drops = sum(v for k, v in stats.items() if k.startswith("drop_"))
    return [
        f"frames: {stats.get('tx_frames', 0)} from the guest, "
        f"{stats.get('rx_frames', 0)} to the guest; dropped {drops}"
    ]


@asynccontextmanager
async def nic(workdir: Path, options: DemoOptions) -> AsyncIterator[DemoDevice]:
    """A virtio-net NIC. As root: a TAP whose host end lives in a private network
    namespace; otherwise the `responder` backend answers ARP and ping for the host."""
    sock = workdir / "nic.sock"
    netns = None
    if os.geteuid() == 0:
        netns = f"vdev-demo-{os.getpid()}"
        await trio.to_thread.run_sync(netsetup.create_netns, netns)
        tap = {"tap": f"vdemo{os.getpid() % 100000}", "netns": netns, "address": _HOST_ADDRESS}
        spec = DeviceSpec("net", sock, "tap", tap)
        title = f"virtio-net, tap backend (host end in network namespace {netns})"
    else:
        spec = DeviceSpec("net", sock, "responder", {"address": _HOST_ADDRESS})
        title = "virtio-net, responder backend (answers ARP and ping for 10.0.2.2)"
    try:
        device = await trio.to_thread.run_sync(build_device, spec)
        try:
            yield DemoDevice(
                name="nic",
                title=title,
                device=device,
                socket=sock,
                qemu_args=render_args("vdev-net", id="net0", socket=sock, queues=1, mq=False),
                script=_NIC_SCRIPT,
                summary=_net_summary,
            )
        finally:
            device.close()
    finally:
        if netns is not None:
            await trio.to_thread.run_sync(netsetup.remove_netns, netns)


#: The devices the demo serves, in the order the guest exercises them.
DEMO_DEVICES: list[DemoFactory] = [disk, nic]


# --- running it -------------------------------------------------------------------------


@dataclass
class SectionReport:
    """What one device did."""

    name: str
    title: str
    guest_output: str
    seconds: float
    stats: list[str]
    host: list[str] = field(default_factory=list)


@dataclass
class DemoReport:
    """The whole demo: per-device sections, timings, and the verdict."""

    accel: str
    boot_seconds: float
    total_seconds: float
    sections: list[SectionReport]
    exit_code: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.problems

    def render(self) -> str:
        lines = [f"guest booted in {self.boot_seconds:.1f} s ({self.accel.upper()})"]
        for s in self.sections:
            lines += ["", f"== {s.name}: {s.title}", "   guest:"]
            lines += [f"     | {line}" for line in s.guest_output.splitlines()]
            lines += [f"   {line}" for line in [*s.stats, *s.host]]
            lines.append(f"   took {s.seconds:.1f} s")
        lines.append("")
        lines += [f"problem: {p}" for p in self.problems]
        verdict = "OK" if self.ok else f"FAILED (guest script exit status {self.exit_code})"
        lines.append(f"total {self.total_seconds:.1f} s: {verdict}")
        return "\n".join(lines)


def guest_script(devices: Sequence[DemoDevice]) -> str:
    """Every device's fragment in a subshell under ``set -e``, announced by a `SECTION`
    line; the script fails if any fragment failed (and still runs the others)."""
    parts = ["status=0"]
    for d in devices:
        # Not `( ... ) || ...`: set -e is ignored on the left of ||.
        parts += [
            f'echo "{SECTION} {d.name}"',
            "(",
            "set -e",
            textwrap.dedent(d.script).strip(),
            ")",
            f'rc=$?; [ $rc -eq 0 ] || {{ echo "{d.name}: FAILED (status $rc)"; status=1; }}',
        ]
    parts += [f'echo "{SECTION} end"', "exit $status"]
    return "\n".join(parts) + "\n"


def split_sections(output: str, names: Sequence[str]) -> dict[str, str]:
    """The guest output of each device's fragment."""
    found: dict[str, str] = {}
    for chunk in output.split(SECTION)[1:]:
        name, _, text = chunk.partition("\n")
        if name.strip() in names:
            found[name.strip()] = text.rstrip("\n")
    return found


async def run_demo(options: DemoOptions) -> DemoReport:
    """Serve every device of `DEMO_DEVICES`, boot the guest on them, and report.

    Temporary files and sockets live in a private directory removed at the end.
    """
    with tempfile.TemporaryDirectory(prefix="vdev-demo-") as tmp:
        async with AsyncExitStack() as stack:
            devices = [
                await stack.enter_async_context(factory(Path(tmp), options))
                for factory in DEMO_DEVICES
            ]
            return await _run(devices, options)


async def _boot(
    devices: list[DemoDevice],
    image: GuestImage,
    accel: str,
    timeout: float,
    marks: dict[str, float],
) -> GuestResult:
    """Run the guest to the end, noting in `marks` when it booted and when each
    device's section began."""
    async with start_guest(
        guest_script(devices),
        qemu_args=[arg for d in devices for arg in d.qemu_args],
        mem=GUEST_MEM,
        accel=accel,
        image=image,
    ) as guest:
        try:
            with trio.fail_after(timeout):
                await guest.wait_for(USERSPACE_MARKER)
                marks["boot"] = time.monotonic()
                for name in [*(d.name for d in devices), "end"]:
                    await guest.wait_for(f"{SECTION} {name}\n")
                    marks[name] = time.monotonic()
                return await guest.wait()
        except trio.TooSlowError:
            raise guest.error(f"the demo did not finish within {timeout} s") from None


async def _run(devices: list[DemoDevice], options: DemoOptions) -> DemoReport:
    binaries = tuple(dict.fromkeys(b for d in devices for b in d.extra_binaries))
    modules = tuple(dict.fromkeys(m for d in devices for m in d.extra_modules))
    log.info("preparing the guest (kernel and initramfs, cached after the first run)")
    image = await build_guest(extra_binaries=binaries, extra_modules=modules)
    accel = await trio.to_thread.run_sync(
        partial(choose_accel, options.accel, kernel=image.kernel, initrd=image.initramfs)
    )
    names = [d.name for d in devices]
    marks: dict[str, float] = {"start": time.monotonic()}
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            for d in devices:
                await nursery.start(DeviceServer(d.device, d.socket).serve)
            log.info("booting the guest (%s) with: %s", accel.upper(), ", ".join(names))
            result = await _boot(devices, image, accel, options.timeout, marks)
            nursery.cancel_scope.cancel()
    marks["end"] = time.monotonic()
    outputs = split_sections(result.output, names)
    report = DemoReport(
        accel=accel,
        boot_seconds=marks["boot"] - marks["start"],
        total_seconds=marks["end"] - marks["start"],
        sections=[],
        exit_code=result.exit_code,
    )
    for d, start, end in zip(devices, names, [*names[1:], "end"], strict=True):
        host: list[str] = []
        if result.exit_code == 0:
            try:
                host = await trio.to_thread.run_sync(d.check)
            except DemoError as exc:
                report.problems.append(f"{d.name}: {exc}")
        report.sections.append(
            SectionReport(
                d.name,
                d.title,
                outputs.get(d.name, ""),
                marks[end] - marks[start],
                d.summary(d.device.stats()),
                host,
            )
        )
    return report
