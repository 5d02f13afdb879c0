"""pytest plugin for vdev backend and device authors (loaded through the ``pytest11``
entry point whenever vdev is installed; the fixtures are async: use pytest-trio with
``trio_mode = true``).

Fixtures:

- ``vdev_frontend``: ``fe = await vdev_frontend(device_or_backend, packed=False)`` serves
  a `Device` (or a block / net backend, wrapped in `BlkDevice` / `NetDevice`) in this
  process on a socket of its own and returns a connected, negotiated
  `vdev.testing.Frontend`; ``vdev_ring_layout`` ("split", "packed") runs a test on both.
- ``vdev_daemon``: ``d = await vdev_daemon("blk", "--backend", "ram", "--size", "16M")``
  starts ``vdev run <args> --socket <private path>`` as a subprocess and waits until
  it listens; at teardown it is sent SIGTERM, and the test fails with the daemon's log
  if it died early or exited non-zero.
- ``vdev_guest``: ``result = await vdev_guest(script, qemu_args=[...])`` boots a real
  Linux guest (`vdev.testing.guest`) and runs ``script`` in it; each guest image is
  built (or found in the on-disk cache) once per session.

Markers ``requires_qemu``, ``requires_root`` and ``requires_testpmd`` skip a test, with
the reason, when the thing is missing; ``--vdev-require-all`` makes those skips failures
(for CI, where everything is installed). A test using ``vdev_guest`` requires QEMU.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from vdev import qemu
from vdev.backend import BlockBackend, NetBackend
from vdev.config import ConfigError, load_config
from vdev.ctl.client import request as ctl_request
from vdev.ctl.server import default_control_path
from vdev.devices.base import Device
from vdev.devices.blk import BlkDevice
from vdev.devices.net import NetDevice
from vdev.testing.frontend import Frontend, serve_device
from vdev.testing.guest import (
    Guest,
    GuestImage,
    GuestResult,
    build_guest,
    run_guest,
    start_guest,
)

REQUIRE_ALL = "--vdev-require-all"
#: How long a daemon may take to create its socket(s), and to exit on SIGTERM.
DAEMON_START_TIMEOUT = 30.0
DAEMON_STOP_TIMEOUT = 30.0
TUN_DEVICE = "/dev/net/tun"


# --- markers ----------------------------------------------------------------------------


def _qemu_missing() -> str | None:
    if shutil.which(qemu.QEMU_BINARY) is None:
        return f"{qemu.QEMU_BINARY} not installed (Debian package {qemu.QEMU_PACKAGE})"
    return None


def _root_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (TAP devices, network namespaces)"
    if not os.path.exists(TUN_DEVICE):
        return f"needs {TUN_DEVICE} (TAP devices)"
    return None


def _testpmd_missing() -> str | None:
    from vdev.bench.net import DPDK_PACKAGES, TESTPMD  # pyroute2: only when asked

    if shutil.which(TESTPMD) is None:
        return f"{TESTPMD} not installed (apt-get install {DPDK_PACKAGES})"
    return None


@dataclass(frozen=True)
class Requirement:
    """A marker that skips a test when `missing` returns a reason."""

    marker: str
    description: str
    missing: Callable[[], str | None]


REQUIREMENTS = (
    Requirement("requires_qemu", f"needs {qemu.QEMU_BINARY} (boots a real guest)", _qemu_missing),
    Requirement("requires_root", f"needs root and {TUN_DEVICE}", _root_missing),
    Requirement("requires_testpmd", "needs DPDK's dpdk-testpmd", _testpmd_missing),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vdev")
    group.addoption(
        REQUIRE_ALL,
        action="store_true",
        help="fail, instead of skipping, tests whose requires_qemu / requires_root / "
        "requires_testpmd requirement is missing",
    )


def pytest_configure(config: pytest.Config) -> None:
    for requirement in REQUIREMENTS:
        config.addinivalue_line(
            "markers",
            f"{requirement.marker}: {requirement.description}; skipped when missing "
            f"(a failure with {REQUIRE_ALL})",
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "vdev_guest" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.requires_qemu)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for requirement in REQUIREMENTS:
        if item.get_closest_marker(requirement.marker) is None:
            continue
        reason = requirement.missing()
        if reason is None:
            continue
        if item.config.getoption(REQUIRE_ALL):
            pytest.fail(f"{requirement.marker}: {reason} ({REQUIRE_ALL})", pytrace=False)
        pytest.skip(reason)


# --- in-process device and front-end ------------------------------------------------------


def as_device(target: Device | BlockBackend | NetBackend) -> Device:
    """`target` itself if it is a Device, else the device model for its backend kind."""
    if isinstance(target, Device):
        return target
    if isinstance(target, BlockBackend):
        return BlkDevice(target)
    if isinstance(target, NetBackend):
        return NetDevice(target)
    raise TypeError(f"{type(target).__name__} is not a vdev Device, BlockBackend or NetBackend")


class FrontendFactory:
    """``await factory(device_or_backend, packed=False)``: see `vdev_frontend`."""

    def __init__(self, nursery: trio.Nursery, directory: Path) -> None:
        self._nursery = nursery
        self._directory = directory
        self._count = itertools.count()

    async def __call__(
        self,
        target: Device | BlockBackend | NetBackend,
        *,
        packed: bool = False,
        features: int | None = None,
        mem_size: int = 8 << 20,
    ) -> Frontend:
        """Serve `target` and return a front-end connected to it and negotiated (all
        offered features but RING_PACKED, unless `packed`; or exactly `features`).
        Queues are then set up with ``await fe.setup_queue(index)``."""
        path = self._directory / f"frontend{next(self._count)}.sock"
        session = partial(self._session, as_device(target), path, packed, features, mem_size)
        return await self._nursery.start(session)

    @staticmethod
    async def _session(
        device: Device,
        path: Path,
        packed: bool,
        features: int | None,
        mem_size: int,
        task_status: trio.TaskStatus[Frontend],
    ) -> None:
        """Serve and connect in the fixture's nursery, until the fixture's teardown."""
        try:
            async with (
                serve_device(device, path),
                Frontend.connect(path, mem_size=mem_size) as fe,
            ):
                await fe.negotiate(features, packed=packed)
                task_status.started(fe)
                await trio.sleep_forever()
        finally:
            device.close()


@pytest.fixture
def vdev_socket_dir() -> Iterator[Path]:
    """A short private directory for the fixtures' sockets: a Unix socket path has at
    most 107 bytes, which a nested ``tmp_path`` can exceed."""
    with tempfile.TemporaryDirectory(prefix="vdev-") as directory:
        yield Path(directory)


@pytest.fixture
async def vdev_frontend(vdev_socket_dir: Path) -> AsyncIterator[FrontendFactory]:
    """A factory: ``fe = await vdev_frontend(device_or_backend, packed=False)`` serves the
    device in this process and returns a negotiated `vdev.testing.Frontend`. Front-ends,
    servers and devices (closed) are torn down at the end of the test."""
    async with trio.open_nursery() as nursery:
        yield FrontendFactory(nursery, vdev_socket_dir)
        nursery.cancel_scope.cancel()


@pytest.fixture(params=("split", "packed"))
def vdev_ring_layout(request: pytest.FixtureRequest) -> str:
    """Run the test once per ring layout: "split", then "packed"."""
    return request.param


# --- vdev run as a subprocess -------------------------------------------------------------


def _option(args: Sequence[str], name: str) -> str | None:
    """The value of ``name VALUE`` or ``name=VALUE`` in `args` (the last one given)."""
    value = None
    for n, arg in enumerate(args):
        if arg == name and n + 1 < len(args):
            value = args[n + 1]
        elif arg.startswith(f"{name}="):
            value = arg.partition("=")[2]
    return value


def _remove_if_stale(path: Path) -> None:
    """Remove `path` if it is a socket nobody listens on (left by a killed daemon)."""
    if not path.is_socket():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink(missing_ok=True)


def _listening(paths: Sequence[Path]) -> bool:
    """Whether every one of `paths` is a socket: vdev renames a socket into place once
    it listens (`vdev.server.listen_unix`), and stale ones are removed before a start."""
    return all(path.is_socket() for path in paths)


@dataclass
class Daemon:
    """A ``vdev run`` subprocess started by `vdev_daemon`."""

    process: trio.Process
    #: Where its stdout and stderr go.
    log: Path
    #: The sockets it listens on (those of a --config file, in order).
    sockets: tuple[Path, ...]
    #: Its control socket (`vdev ctl`); None when started with ``--control none``.
    control: Path | None = None
    stopped: bool = field(default=False, init=False)

    @property
    def socket(self) -> Path:
        """Its (first) vhost-user socket."""
        return self.sockets[0]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send `sig`, wait for it to exit (killed after DAEMON_STOP_TIMEOUT); its status."""
        self.stopped = True
        with trio.CancelScope(shield=True):
            if self.process.poll() is None:
                self.process.send_signal(sig)
                with trio.move_on_after(DAEMON_STOP_TIMEOUT):
                    return await self.process.wait()
                self.process.kill()
            return await self.process.wait()

    async def stats(self) -> list[dict[str, Any]]:
        """Its devices' state and counters, as ``vdev ctl stats --json`` prints them
        (one dict per device, each with its ``queues``), read from its control socket."""
        if self.control is None:
            raise RuntimeError("this daemon runs without a control socket (--control none)")
        reply = await trio.to_thread.run_sync(ctl_request, self.control, {"cmd": "stats"})
        return reply["devices"]


class DaemonFactory:
    """``await factory(*args, env=None)``: see `vdev_daemon`."""

    def __init__(self, socket_dir: Path, log_dir: Path) -> None:
        self._socket_dir = socket_dir
        self._log_dir = log_dir
        self._count = itertools.count()
        self.daemons: list[Daemon] = []

    async def __call__(self, *args: str, env: Mapping[str, str] | None = None) -> Daemon:
        """Start ``vdev run <args>`` (plus ``--socket`` in `vdev_socket_dir` unless `args`
        name a --socket or a --config) with environment `env` (default: this process's),
        and return once it listens on its socket(s)."""
        n = next(self._count)
        args_list = list(args)
        config = _option(args_list, "--config")
        socket = _option(args_list, "--socket")
        if config is not None:
            try:
                specs = load_config(Path(config))
            except ConfigError as exc:
                pytest.fail(f"vdev_daemon: {exc}", pytrace=False)
            sockets = tuple(spec.socket for spec in specs)
            listening = tuple(spec.socket for spec in specs if not spec.client)
        else:
            if socket is None:
                socket = str(self._socket_dir / f"vdev{n}.sock")
                args_list += ["--socket", socket]
            sockets = (Path(socket),)
            listening = () if "--client" in args_list else sockets
        control_option = _option(args_list, "--control")
        control = (
            None
            if control_option == "none"
            else Path(control_option or default_control_path(sockets[0]))
        )
        if control is not None:
            listening += (control,)
        for path in listening:
            _remove_if_stale(path)
        log = self._log_dir / f"vdev{n}.log"
        argv = [sys.executable, "-m", "vdev.cli", "run", *args_list]
        with log.open("wb") as out:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
            )
        daemon = Daemon(process, log, sockets, control)
        self.daemons.append(daemon)  # stopped at teardown even if the test is cancelled
        with trio.move_on_after(DAEMON_START_TIMEOUT):
            while process.poll() is None and not _listening(listening):
                await trio.sleep(0.02)
        if process.poll() is None and _listening(listening):
            return daemon
        self.daemons.remove(daemon)  # reported here, not again at teardown
        if process.poll() is not None:
            problem = f"vdev run exited (status {process.returncode}) before serving"
        else:
            await daemon.stop()
            problem = (
                f"vdev run did not listen on {', '.join(map(str, listening))} "
                f"in {DAEMON_START_TIMEOUT:.0f} s"
            )
        pytest.fail(f"{problem}:\n{daemon.log_text()}", pytrace=False)

    async def close(self) -> list[str]:
        """Stop every daemon still running; what went wrong with each, if anything."""
        problems = []
        for daemon in self.daemons:
            if daemon.stopped and daemon.process.returncode is not None:
                continue  # stopped by the test (Daemon.stop), which got its status
            died = not daemon.stopped and daemon.process.poll() is not None
            status = await daemon.stop()
            if died:
                problem = f"vdev run died during the test (status {status})"
            elif status != 0:
                problem = f"vdev run exited with status {status} on SIGTERM"
            else:
                continue
            problems.append(f"{problem}; its log ({daemon.log}):\n{daemon.log_text()}")
        return problems


@pytest.fixture
async def vdev_daemon(tmp_path: Path, vdev_socket_dir: Path) -> AsyncIterator[DaemonFactory]:
    """A factory: ``d = await vdev_daemon(*args)`` runs ``vdev run <args>`` and returns a
    `Daemon` (``.socket``, ``.log``, ``.process``) once it serves. At teardown each one
    still running is sent SIGTERM; the test fails with the log if one died early or
    exited non-zero (one the test stopped itself, ``await daemon.stop(signal)``, is not
    checked again: a test may kill -9 its daemon)."""
    factory = DaemonFactory(vdev_socket_dir, tmp_path)
    try:
        yield factory
    finally:
        problems = await factory.close()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


# --- real guests --------------------------------------------------------------------------


class GuestImages:
    """Guest images built in this session, by (extra binaries, extra modules)."""

    def __init__(self) -> None:
        self._built: dict[tuple[tuple[str, ...], tuple[str, ...]], GuestImage] = {}

    async def get(
        self, extra_binaries: Sequence[str] = (), extra_modules: Sequence[str] = ()
    ) -> GuestImage:
        key = (tuple(extra_binaries), tuple(extra_modules))
        if key not in self._built:
            self._built[key] = await build_guest(extra_binaries=key[0], extra_modules=key[1])
        return self._built[key]


@pytest.fixture(scope="session")
def vdev_guest_images() -> GuestImages:
    """The session's guest images (each built, or found in the disk cache, once)."""
    return GuestImages()


class GuestRunner:
    """``await runner(script, qemu_args=[...])``: see `vdev_guest`."""

    def __init__(self, images: GuestImages) -> None:
        self.images = images

    @asynccontextmanager
    async def start(
        self,
        script: str,
        *,
        extra_binaries: Sequence[str] = (),
        extra_modules: Sequence[str] = (),
        **options: Any,
    ) -> AsyncIterator[Guest]:
        """`vdev.testing.guest.start_guest` on the session's image (`options`: its
        qemu_args, mem, cpus, accel, kernel_args): ``async with vdev_guest.start(script)
        as guest`` gives the running guest. `extra_binaries` and `extra_modules` go into
        the image (`build_guest`)."""
        image = await self.images.get(extra_binaries, extra_modules)
        async with start_guest(script, image=image, **options) as guest:
            yield guest

    async def __call__(
        self,
        script: str,
        *,
        extra_binaries: Sequence[str] = (),
        extra_modules: Sequence[str] = (),
        **options: Any,
    ) -> GuestResult:
        """Boot a guest, run `script` in it under /bin/sh and return its output and exit
        status: `vdev.testing.guest.run_guest` on the session's image (`options`: its
        qemu_args, mem, cpus, accel, timeout; GuestTimeout, GuestPanic, GuestError)."""
        image = await self.images.get(extra_binaries, extra_modules)
        return await run_guest(script, image=image, **options)


@pytest.fixture
def vdev_guest(vdev_guest_images: GuestImages) -> GuestRunner:
    """``result = await vdev_guest(script, qemu_args=[...], mem=..., timeout=...)`` boots
    a real guest with the given devices and runs `script`; ``vdev_guest.start(...)``
    yields the running guest instead. Marks the test requires_qemu."""
    return GuestRunner(vdev_guest_images)
