"""Real-guest harness: a stock Debian kernel and a busybox initramfs, booted under QEMU.

`build_guest` makes (once, cached) the kernel and a base initramfs whose /init mounts
/proc, /sys and /dev, loads the virtio modules and runs a per-run shell script.
`run_guest` boots it with the script appended as a second cpio archive and returns the
script's output and exit status; `start_guest` gives access to the guest while it runs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import lzma
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import trio

from vdev.qemu import DEFAULT_APPEND, USERSPACE_MARKER, GuestCommand, cache_root, choose_accel
from vdev.trioutil import unwrap_single

log = logging.getLogger(__name__)

KERNEL_META_PACKAGE = "linux-image-amd64"
#: Loaded in this order by /init (with their dependencies first, when not built in).
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
)
#: Where `build_guest` puts ``extra_binaries`` in the guest (first on the guest's PATH).
EXTRA_BIN_DIR = "/usr/local/bin"

_LAYOUT_VERSION = 1  # part of the cache key: bump when the initramfs layout changes
_BEGIN = "VDEV-SCRIPT-BEGIN"
_END = "VDEV-SCRIPT-END"
_PANIC = "Kernel panic - not syncing"
_TAIL_LINES = 30
_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")
_S_IFDIR, _S_IFREG, _S_IFCHR = 0o040000, 0o100000, 0o020000

# The script's output reaches the host byte for byte: `stty -opost` stops the tty from
# turning \n into \r\n, and printk is limited to emergencies while the script runs.
_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH={extra_bin}:/bin HOME=/
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /tmp /run
mount -t tmpfs tmpfs /dev/shm
echo "{marker}"
for m in {modules}; do
    insmod "/lib/modules/$m.ko" || echo "vdev-guest: insmod $m failed"
done
if [ -f /vdev/script.sh ]; then
    read -r token < /vdev/token
    stty -opost
    echo 1 > /proc/sys/kernel/printk
    echo "{begin}-$token"
    (cd / && exec /bin/sh /vdev/script.sh) < /dev/null
    rc=$?
    printf '\\n{end}-%s rc=%d\\n' "$token" "$rc"
fi
sync
poweroff -f
"""


class GuestError(RuntimeError):
    """The guest could not be built, did not boot, or stopped before its script finished."""

    def __init__(self, message: str, console: str = "") -> None:
        super().__init__(message)
        self.console = console


class GuestBuildError(GuestError):
    """The kernel or initramfs could not be made (apt, dpkg-deb, a missing binary...)."""


class GuestTimeout(GuestError):
    """The guest did not finish in time; QEMU was killed."""


class GuestPanic(GuestError):
    """The guest kernel panicked."""


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: kernel image and base initramfs (uncompressed newc cpio)."""

    kernel: Path
    initramfs: Path


@dataclass(frozen=True)
class GuestResult:
    """What a guest script printed (stdout and stderr), its exit status, the whole console."""

    output: str
    exit_code: int
    console: str


class _Cpio:
    """Writer of a newc ("070701") cpio archive, the format the kernel unpacks as initramfs."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._inode = 0
        self._dirs: set[str] = set()

    def _entry(
        self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._inode += 1
        name = path.strip("/").encode() + b"\0"
        nlink = 2 if mode & _S_IFDIR else 1
        fields = (self._inode, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(name), 0)
        header = b"070701" + "".join(f"{field:08X}" for field in fields).encode() + name
        self._out.write(header + bytes(-len(header) % 4) + data + bytes(-len(data) % 4))

    def directory(self, path: str) -> None:
        path = path.rstrip("/")
        if not path or path in self._dirs:
            return
        self.directory(os.path.dirname(path))
        self._dirs.add(path)
        self._entry(path, _S_IFDIR | 0o755)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.directory(os.path.dirname(path))
        self._entry(path, _S_IFREG | mode, data)

    def char_device(self, path: str, major: int, minor: int) -> None:
        self.directory(os.path.dirname(path))
        self._entry(path, _S_IFCHR | 0o600, rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer, padded to 512 bytes so another archive may follow."""
        self._entry("TRAILER!!!", 0)
        self._out.write(bytes(-self._out.tell() % 512))


def _run(argv: Sequence[str], *, cwd: Path | None = None, hint: str = "") -> str:
    """Run a build tool; its absence or failure is a `GuestBuildError`."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise GuestBuildError(f"{argv[0]} is not available. {hint}".strip()) from None
    if done.returncode != 0:
        raise GuestBuildError(
            f"{shlex.join(argv)} failed (status {done.returncode}): {done.stderr.strip()} {hint}"
        )
    return done.stdout


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def _atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` only once completely written."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as tmp:
        try:
            yield tmp
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)


def _kernel_deb(kernel_dir: Path) -> Path:
    """The cached kernel package; fetched with apt-get download only if there is none."""
    debs = sorted(kernel_dir.glob("linux-image-*.deb"), key=lambda p: p.stat().st_mtime)
    if debs:
        return debs[-1]
    hint = (
        f"The guest kernel comes from the Debian package {KERNEL_META_PACKAGE} (apt); "
        f"without apt, put a linux-image-*.deb into {kernel_dir}."
    )
    depends = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], hint=hint)
    match = re.search(r"^\s*\|?Depends:\s*(linux-image-\S+)", depends, re.MULTILINE)
    if match is None:
        raise GuestBuildError(f"{KERNEL_META_PACKAGE} names no kernel package. {hint}")
    log.info("downloading %s with apt-get", match.group(1))
    with tempfile.TemporaryDirectory(dir=kernel_dir) as tmp:
        _run(["apt-get", "download", match.group(1)], cwd=Path(tmp), hint=hint)
        (deb,) = Path(tmp).glob("*.deb")
        return deb.replace(kernel_dir / deb.name)


def _pvh_kernel(vmlinuz: Path, config: Path) -> bytes:
    """The kernel image to boot: the uncompressed ELF vmlinux when the kernel has a PVH
    entry point (QEMU loads it directly, skipping the in-guest decompressor: seconds
    saved under TCG), else the bzImage as packaged."""
    image = vmlinuz.read_bytes()
    options = set(config.read_text().splitlines()) if config.is_file() else set()
    if not {"CONFIG_PVH=y", "CONFIG_KERNEL_XZ=y"} <= options:
        return image
    start = image.find(b"\xfd7zXZ\x00")
    while start >= 0:
        try:
            elf = lzma.LZMADecompressor().decompress(image[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        start = image.find(b"\xfd7zXZ\x00", start + 1)
    return image


def _module_name(path: Path | str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def _read_module(path: Path) -> bytes:
    if path.name.endswith(".ko"):
        return path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    raise GuestBuildError(f"unsupported kernel module compression: {path.name}")


def _modules_in_load_order(moddir: Path, names: Sequence[str]) -> list[tuple[str, bytes]]:
    """``names`` and their dependencies (from each module's modinfo), dependencies first;
    modules built into the kernel are left out."""
    available = {_module_name(p): p for p in (moddir / "kernel").rglob("*.ko*")}
    builtin_list = moddir / "modules.builtin"
    builtin = set(map(_module_name, builtin_list.read_text().split()))
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name not in available:
            raise GuestBuildError(f"kernel module {name} is not in the kernel package")
        seen.add(name)
        data = _read_module(available[name])
        match = _DEPENDS.search(data)
        for dep in match.group(1).decode().split(",") if match else ():
            if dep:
                visit(dep)
        ordered.append((name, data))

    for name in names:
        visit(name)
    return ordered


def _host_binary(name: str) -> Path:
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    found = name if "/" in name else shutil.which(name, path=search)
    if not found or not os.access(found, os.X_OK):
        raise GuestBuildError(f"binary {name!r} not found on the host: install it (apt-get)")
    return Path(found)


def _shared_libraries(binary: Path) -> list[str]:
    """Absolute paths of the libraries ``binary`` loads, as ldd names them."""
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if "not a dynamic executable" in done.stdout + done.stderr:
            return []
        raise GuestBuildError(f"ldd {binary} failed: {done.stderr.strip()}")
    if "not found" in done.stdout:
        raise GuestBuildError(f"{binary} needs libraries the host lacks:\n{done.stdout}")
    return _LDD_PATH.findall(done.stdout)


def _payload(extra_binaries: Sequence[str]) -> dict[str, Path]:
    """Guest path -> host file: busybox, the extra binaries, and every library they load."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise GuestBuildError("busybox not found on the host: apt-get install busybox-static")
    files = {"/bin/busybox": Path(busybox)}
    for name in extra_binaries:
        binary = _host_binary(name)
        files[f"{EXTRA_BIN_DIR}/{binary.name}"] = binary
    for binary in list(files.values()):
        for library in _shared_libraries(binary):
            files.setdefault(library, Path(library))
    return files


def _cache_key(deb: Path, modules: Sequence[str], payload: dict[str, Path]) -> str:
    digest = hashlib.sha256(f"{_LAYOUT_VERSION}\n{_INIT}\n{deb.name}\n{modules}\n".encode())
    for guest_path, host_path in sorted(payload.items()):
        st = host_path.stat()
        digest.update(f"{guest_path}={host_path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _write_initramfs(
    out: BinaryIO, modules: list[tuple[str, bytes]], payload: dict[str, Path]
) -> None:
    cpio = _Cpio(out)
    for directory in ("/proc", "/sys", "/dev", "/tmp", "/run", "/lib/modules", EXTRA_BIN_DIR):
        cpio.directory(directory)
    cpio.char_device("/dev/console", 5, 1)
    init = _INIT.format(
        extra_bin=EXTRA_BIN_DIR,
        marker=USERSPACE_MARKER,
        modules=" ".join(name for name, _ in modules),
        begin=_BEGIN,
        end=_END,
    )
    cpio.file("/init", init.encode(), 0o755)
    for name, data in modules:
        cpio.file(f"/lib/modules/{name}.ko", data)
    for guest_path, host_path in sorted(payload.items()):
        cpio.file(guest_path, host_path.read_bytes(), 0o755)
    cpio.close()


def _build(cache: Path, extra_binaries: Sequence[str], modules: Sequence[str]) -> GuestImage:
    kernel_dir = cache / "kernel"
    kernel_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache):
        deb = _kernel_deb(kernel_dir)
        payload = _payload(extra_binaries)
        kernel = kernel_dir / f"{deb.stem}.kernel"
        initramfs = cache / f"initramfs-{_cache_key(deb, modules, payload)}.cpio"
        if kernel.is_file() and initramfs.is_file():
            return GuestImage(kernel, initramfs)
        log.info("building guest image in %s", cache)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            root = Path(tmp)
            _run(["dpkg-deb", "-x", str(deb), str(root)], hint="Install the dpkg package.")
            moddirs = [*root.glob("lib/modules/*"), *root.glob("usr/lib/modules/*")]
            if len(moddirs) != 1:
                raise GuestBuildError(f"{deb.name}: expected one lib/modules/<release>")
            release = moddirs[0].name
            if not kernel.is_file():
                with _atomic_output(kernel) as out:
                    boot = root / "boot"
                    out.write(_pvh_kernel(boot / f"vmlinuz-{release}", boot / f"config-{release}"))
            with _atomic_output(initramfs) as out:
                _write_initramfs(out, _modules_in_load_order(moddirs[0], modules), payload)
        return GuestImage(kernel, initramfs)


async def build_guest(
    cache_dir: Path | None = None,
    extra_binaries: Sequence[str] = (),
    extra_modules: Sequence[str] = (),
) -> GuestImage:
    """The guest kernel and base initramfs, built once and cached.

    ``cache_dir`` defaults to ``<cache_root>/guest`` (~/.cache/vdev/guest, or
    $VDEV_CACHE/guest). The kernel package is fetched with ``apt-get download`` only when
    the cache has none. ``extra_binaries`` (names on the host PATH, or paths) are copied to
    /usr/local/bin in the guest with the shared libraries ldd lists; ``extra_modules`` are
    kernel modules loaded after the virtio ones (with their dependencies).
    """
    cache = cache_dir if cache_dir is not None else cache_root() / "guest"
    modules = (*VIRTIO_MODULES, *extra_modules)
    build = partial(_build, cache, tuple(extra_binaries), modules)
    return await trio.to_thread.run_sync(build)


def _write_run_initrd(base: Path, dest: Path, script: str, token: str) -> None:
    """The base initramfs followed by a second archive holding the script and its token."""
    shutil.copyfile(base, dest)
    with dest.open("ab") as out:
        cpio = _Cpio(out)
        cpio.file("/vdev/script.sh", script.encode(), 0o755)
        cpio.file("/vdev/token", f"{token}\n".encode())
        cpio.close()


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Guest:
    """A running guest (see `start_guest`): its console so far, and ways to wait on it."""

    def __init__(
        self,
        process: trio.Process,
        token: str,
        command: GuestCommand,
        source: Guest | None = None,
    ) -> None:
        self._process = process
        self._token = token
        #: The QEMU command line it runs.
        self.command = command
        #: The guest this one was migrated from (`start_incoming`), if any.
        self.source = source
        self._console = bytearray()
        self._stderr = bytearray()
        self._open_streams = 2
        self._changed = trio.Event()

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self._process.pid

    @property
    def console(self) -> str:
        """Everything the guest printed on its serial console so far (on the QEMU it
        was migrated from first)."""
        own = self._console.decode(errors="replace").replace("\r\n", "\n")
        return own if self.source is None else self.source.console + own

    @property
    def qemu_stderr(self) -> str:
        """QEMU's own messages so far."""
        return self._stderr.decode(errors="replace")

    async def _pump(self, stream: trio.abc.ReceiveStream, buffer: bytearray) -> None:
        while chunk := await stream.receive_some():
            buffer += chunk
            self._notify()
        self._open_streams -= 1
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def error(self, message: str, kind: type[GuestError] = GuestError) -> GuestError:
        """``kind`` (or `GuestPanic` when the console shows one) with the console's tail."""
        console = self.console
        if _PANIC in console:
            kind, message = GuestPanic, f"guest kernel panicked ({message})"
        details = f"{message}\n--- guest console (tail) ---\n{_tail(console)}"
        if self._stderr:
            details += f"\n--- QEMU stderr ---\n{_tail(self.qemu_stderr)}"
        return kind(details, console)

    async def wait_for(self, text: str) -> None:
        """Return once ``text`` appears on the console; `GuestError` if QEMU exits first."""
        needle = text.encode()
        while needle not in self._console:
            if not self._open_streams:
                raise self.error(f"QEMU exited before the guest printed {text!r}")
            await self._changed.wait()

    async def wait(self) -> GuestResult:
        """Wait for QEMU to exit and return the script's result."""
        while self._open_streams:
            await self._changed.wait()
        status = await self._process.wait()
        match = re.search(
            rf"{_BEGIN}-{self._token}\r?\n(.*?)\r?\n{_END}-{self._token} rc=(\d+)",
            self.console,
            re.DOTALL,
        )
        if match is None:
            raise self.error(f"QEMU exited (status {status}) before the guest script finished")
        return GuestResult(match.group(1), int(match.group(2)), self.console)


@asynccontextmanager
async def start_guest(
    script: str,
    *,
    qemu_args: Sequence[str] = (),
    mem: str | int | None = "512M",
    cpus: int = 1,
    accel: str = "auto",
    image: GuestImage | None = None,
    kernel_args: str = "",
) -> AsyncIterator[Guest]:
    """Boot a guest that runs ``script`` under /bin/sh, and yield it while it runs.

    ``qemu_args`` are appended to the command line (devices, typically `render_args`
    output), ``kernel_args`` to the kernel's; guest RAM is a shared memfd of size
    ``mem`` (None: ``qemu_args`` bring
    their own, as `vdev qemu-args` prints them). QEMU is killed when the block
    exits, however it exits: call `Guest.wait` first to let the guest finish.
    """
    if image is None:
        image = await build_guest()
    accel = await trio.to_thread.run_sync(
        partial(choose_accel, accel, kernel=image.kernel, initrd=image.initramfs)
    )
    token = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="vdev-guest-") as tmp:
        initrd = Path(tmp) / "initramfs.cpio"
        await trio.to_thread.run_sync(_write_run_initrd, image.initramfs, initrd, script, token)
        command = GuestCommand(
            image.kernel,
            initrd,
            append=f"{DEFAULT_APPEND} {kernel_args}".rstrip(),
            mem=mem,
            cpus=cpus,
            accel=accel,
            extra_args=(qemu_args,),
        )
        async with _running(command, token) as guest:
            yield guest


@asynccontextmanager
async def start_incoming(source: Guest, uri: str, qemu_args: Sequence[str]) -> AsyncIterator[Guest]:
    """Start a QEMU waiting to receive `source` by live migration (``-incoming uri``),
    and yield it: the same machine, with `qemu_args` (its own devices: another
    vhost-user socket, another QMP socket) in place of the source's. Start the
    migration on the source (`vdev.testing.qmp`); the yielded guest's `Guest.wait`
    returns the script's result once it finishes there. Open inside `source`'s block
    (its initramfs must still exist)."""
    command = dataclasses.replace(source.command, extra_args=(qemu_args, ["-incoming", uri]))
    async with _running(command, source._token, source) as guest:
        yield guest


@asynccontextmanager
async def _running(
    command: GuestCommand, token: str, source: Guest | None = None
) -> AsyncIterator[Guest]:
    """Run QEMU with `command`; it is killed when the block exits."""
    argv = command.argv()
    log.debug("starting QEMU: %s", shlex.join(argv))
    run_qemu = partial(
        trio.run_process,
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        check=False,
    )
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            # Cancelling run_process terminates QEMU and waits for it to exit.
            process = await nursery.start(run_qemu)
            guest = Guest(process, token, command, source)
            nursery.start_soon(guest._pump, process.stdout, guest._console)
            nursery.start_soon(guest._pump, process.stderr, guest._stderr)
            try:
                yield guest
            finally:
                nursery.cancel_scope.cancel()


async def run_guest(
    script: str,
    *,
    qemu_args: Sequence[str] = (),
    mem: str | int | None = "512M",
    cpus: int = 1,
    accel: str = "auto",
    timeout: float = 120.0,
    image: GuestImage | None = None,
) -> GuestResult:
    """Boot a guest, run ``script`` in it under /bin/sh, power off, return the result.

    ``timeout`` covers boot, script and power-off; on expiry QEMU is killed and
    `GuestTimeout` raised. A kernel panic raises `GuestPanic`; other early exits
    `GuestError`; all carry the console's tail. ``image`` defaults to `build_guest()`.
    """
    async with start_guest(
        script, qemu_args=qemu_args, mem=mem, cpus=cpus, accel=accel, image=image
    ) as guest:
        try:
            with trio.fail_after(timeout):
                return await guest.wait()
        except trio.TooSlowError:
            raise guest.error(f"guest did not finish within {timeout} s", GuestTimeout) from None
