"""QEMU command lines for vdev guests: argument templates, accelerator choice, argv building.

Templates live in ``qemu-configs/*.args``: one QEMU argument per line, ``#`` comment lines,
``{name}`` placeholders. No trio here: plain functions and blocking subprocess probes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vdev.units import parse_size

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
KVM_DEVICE = "/dev/kvm"
ACCELS = ("auto", "kvm", "tcg")
ACCEL_ENV = "VDEV_ACCEL"
CACHE_ENV = "VDEV_CACHE"

#: Printed by the guest's /init as soon as it runs: proof that the kernel reached userspace.
USERSPACE_MARKER = "vdev-guest: userspace reached"
#: Printed by a kernel without an initramfs at the very end of its boot.
_NO_ROOT_PANIC = "VFS: Unable to mount root fs"

#: Serial console on ttyS0, reboot (so QEMU exits, see -no-reboot) on panic, and skip
#: slow probes of hardware a -nodefaults machine does not have.
DEFAULT_APPEND = (
    "console=ttyS0 quiet panic=-1 i8042.noaux i8042.nokbd i8042.nopnp "
    "8250.nr_uarts=1 tsc=reliable no_timer_check"
)

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_MIB = 1 << 20


class QemuError(RuntimeError):
    """QEMU is missing, cannot run as asked, or a template cannot be used."""


def find_qemu() -> str:
    """Path of qemu-system-x86_64, or a `QemuError` naming the Debian package to install."""
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise QemuError(
            f"{QEMU_BINARY} not found on PATH: install the Debian package {QEMU_PACKAGE} "
            f"(apt-get install {QEMU_PACKAGE})"
        )
    return path


def cache_root() -> Path:
    """vdev's cache directory: $VDEV_CACHE, else ~/.cache/vdev."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "vdev"


def configs_dir() -> Path:
    """The qemu-configs folder: in a source checkout, else installed under <prefix>/share/vdev."""
    candidates = (
        Path(__file__).resolve().parent.parent / "qemu-configs",
        Path(sys.prefix) / "share" / "vdev" / "qemu-configs",
    )
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise QemuError("qemu-configs not found; looked in " + ", ".join(map(str, candidates)))


def template_names() -> list[str]:
    """Names accepted by `render_args` (the ``*.args`` files, without the suffix)."""
    return sorted(path.stem for path in configs_dir().glob("*.args"))


def _format_value(value: object) -> str:
    text = ("on" if value else "off") if isinstance(value, bool) else str(value)
    # Placeholders sit inside QEMU option lists, where a literal comma is written ",,".
    return text.replace(",", ",,")


def render_args(name: str, **params: object) -> list[str]:
    """QEMU arguments of template ``name`` (e.g. ``"vdev-blk"``) with its placeholders filled.

    Booleans become ``on``/``off``; commas in values are escaped for QEMU's option syntax.
    A placeholder without a value, or a value no placeholder uses, is a `QemuError`.
    """
    stem = name.removesuffix(".args")
    path = configs_dir() / f"{stem}.args"
    if not path.is_file():
        raise QemuError(f"no QEMU template {stem!r}; known: {', '.join(template_names())}")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    used = {match for line in lines for match in _PLACEHOLDER.findall(line)}
    missing = sorted(used - params.keys())
    if missing:
        names = ", ".join(f"{{{p}}}" for p in missing)
        raise QemuError(f"QEMU template {stem!r}: no value for placeholder {names}")
    unknown = sorted(params.keys() - used)
    if unknown:
        raise QemuError(f"QEMU template {stem!r} has no placeholder {', '.join(unknown)}")
    values = {key: _format_value(value) for key, value in params.items()}
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], line) for line in lines]


def mem_mib(mem: str | int) -> int:
    """A guest memory size in MiB; ``mem`` is bytes or text such as "512M" or "2G"."""
    return parse_size(mem, multiple_of=_MIB) // _MIB


@dataclass(frozen=True)
class GuestCommand:
    """A direct-kernel-boot guest; `argv` gives the full QEMU command line.

    Guest RAM is a shared memfd of size ``mem`` (memory.args) so vhost-user devices can
    map it; ``mem=None`` leaves memory to ``extra_args`` (`vdev qemu-args` output as
    printed). The serial console is on QEMU's stdio. ``extra_args`` are argument lists,
    typically from `render_args`.
    """

    kernel: Path
    initrd: Path | None = None
    append: str = DEFAULT_APPEND
    mem: str | int | None = "512M"
    cpus: int = 1
    accel: str = "tcg"
    extra_args: Sequence[Sequence[str]] = ()
    qemu: str | None = None

    def argv(self) -> list[str]:
        if self.accel not in ("kvm", "tcg"):
            raise QemuError(f"accel must be 'kvm' or 'tcg' here, not {self.accel!r}")
        argv = [self.qemu or find_qemu(), "-nodefaults", "-no-user-config", "-no-reboot"]
        argv += ["-display", "none", "-accel", self.accel]
        if self.accel == "kvm":
            argv += ["-cpu", "host"]
        argv += ["-smp", str(self.cpus)]
        if self.mem is not None:
            mem = f"{mem_mib(self.mem)}M"
            argv += ["-m", mem, *render_args("memory", mem_size=mem)]
        argv += ["-kernel", str(self.kernel)]
        if self.initrd is not None:
            argv += ["-initrd", str(self.initrd)]
        argv += ["-append", self.append, "-serial", "stdio"]
        for args in self.extra_args:
            argv += args
        return argv


def kvm_accessible() -> bool:
    """Whether /dev/kvm exists and this user may open it (not whether it works)."""
    return os.access(KVM_DEVICE, os.R_OK | os.W_OK)


def probe_kvm(kernel: Path, initrd: Path | None = None, *, timeout: float = 20.0) -> bool:
    """Boot ``kernel`` under KVM and report whether it gets to the end of its boot in time.

    With ``initrd`` (a vdev guest initramfs) success means /init printed `USERSPACE_MARKER`;
    without one, that the kernel reached its "cannot mount root" panic. Some hosts offer a
    /dev/kvm that hangs a stock kernel: that shows up here as a timeout.
    """
    argv = GuestCommand(kernel, initrd, mem="256M", accel="kvm").argv()
    marker = USERSPACE_MARKER if initrd is not None else _NO_ROOT_PANIC
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.info("KVM probe: guest did not finish booting within %s s", timeout)
        return False
    output = done.stdout.decode(errors="replace")
    works = marker in output
    if not works:
        log.info("KVM probe failed (QEMU status %s): %s", done.returncode, output[-500:])
    return works


def _verdict_path() -> Path:
    return cache_root() / "accel" / f"kvm-{os.uname().release}.json"


def _cached_verdict() -> bool | None:
    try:
        verdict = json.loads(_verdict_path().read_text())["kvm_works"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return verdict if isinstance(verdict, bool) else None


def _store_verdict(works: bool) -> None:
    path = _verdict_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
        json.dump({"kvm_works": works}, tmp)
    os.replace(tmp.name, path)


def choose_accel(
    requested: str = "auto", *, kernel: Path | None = None, initrd: Path | None = None
) -> str:
    """Resolve an accelerator request to ``"kvm"`` or ``"tcg"``.

    An explicit ``"kvm"``/``"tcg"`` wins; ``"auto"`` defers to $VDEV_ACCEL when set, else
    uses KVM only if it really boots a stock kernel: `probe_kvm` with ``kernel`` (and
    ``initrd``), its verdict cached per host kernel release under `cache_root`. Without a
    kernel to probe and no cached verdict, auto means TCG.
    """
    if requested not in ACCELS:
        raise QemuError(f"accel must be one of {', '.join(ACCELS)}, not {requested!r}")
    if requested == "auto":
        requested = os.environ.get(ACCEL_ENV) or "auto"
        if requested not in ACCELS:
            raise QemuError(f"{ACCEL_ENV} must be one of {', '.join(ACCELS)}, not {requested!r}")
    if requested == "tcg":
        return "tcg"
    if requested == "kvm":
        if not kvm_accessible():
            raise QemuError(f"KVM requested but {KVM_DEVICE} is missing or not accessible")
        return "kvm"
    if not kvm_accessible():
        return "tcg"
    works = _cached_verdict()
    if works is None:
        if kernel is None:
            log.info("no guest kernel to probe KVM with and no cached verdict: using TCG")
            return "tcg"
        log.info("probing whether KVM boots a stock kernel on this host")
        works = probe_kvm(kernel, initrd)
        _store_verdict(works)
    return "kvm" if works else "tcg"
