"""vdev's pytest plugin: its fixtures on real sockets and daemons, and its markers and
teardown checks seen from a pytest run inside this one (pytester)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from vdev_backends.blk_ram import RamBackend

from vdev.devices.blk import CONFIG, BlkDevice, RequestType
from vdev.devices.blk import REQUEST_HEADER as BLK_HEADER
from vdev.testing import Frontend, pytest_plugin
from vdev.testing.guest import GuestImage
from vdev.testing.pytest_plugin import as_device
from vdev.virtio.features import VirtioFeature

MiB = 1 << 20
SECTOR = 512
INNER_INI = "[tool.pytest.ini_options]\ntrio_mode = true\n"


# Inner runs go without faulthandler: its enable/disable in this process would replace
# vdev's SIGBUS guard (vdev.virtio.faults), and a later guest-memory fault test dies.


def capacity(config: bytes) -> int:
    return int.from_bytes(config[:8], "little") * SECTOR


async def test_frontend_serves_a_backend_on_both_layouts(vdev_frontend, vdev_ring_layout) -> None:
    packed = vdev_ring_layout == "packed"
    fe = await vdev_frontend(RamBackend("1M"), packed=packed)
    assert bool(fe.features & VirtioFeature.RING_PACKED) == packed
    assert capacity(await fe.get_config(0, CONFIG.size)) == MiB
    queue = await fe.setup_queue(0)
    data = bytes(range(256)) * 16
    write = await queue.transact([BLK_HEADER.pack(RequestType.OUT, 0, 8), data], [1])
    read = await queue.transact([BLK_HEADER.pack(RequestType.IN, 0, 8)], [len(data), 1])
    assert write.last_byte == read.last_byte == 0
    assert read.data[0] == data


async def test_frontend_serves_several_devices_at_once(vdev_frontend) -> None:
    small = await vdev_frontend(BlkDevice(RamBackend("1M")))
    large = await vdev_frontend(RamBackend("2M"))
    assert capacity(await small.get_config(0, CONFIG.size)) == MiB
    assert capacity(await large.get_config(0, CONFIG.size)) == 2 * MiB


async def test_each_guest_image_is_built_once_per_session(monkeypatch, tmp_path: Path) -> None:
    built = []

    async def build_guest(**kwargs: tuple[str, ...]) -> GuestImage:
        built.append(kwargs)
        return GuestImage(tmp_path / f"kernel{len(built)}", tmp_path / "initramfs")

    monkeypatch.setattr(pytest_plugin, "build_guest", build_guest)
    images = pytest_plugin.GuestImages()
    plain = await images.get()
    assert await images.get() is plain
    with_rng = await images.get(extra_modules=["virtio-rng"])
    assert with_rng is not plain and await images.get((), ["virtio-rng"]) is with_rng
    assert built == [
        {"extra_binaries": (), "extra_modules": ()},
        {"extra_binaries": (), "extra_modules": ("virtio-rng",)},
    ]


def test_as_device_rejects_what_is_not_a_device_or_backend() -> None:
    with pytest.raises(TypeError, match="str is not a vdev Device"):
        as_device("disk.img")  # type: ignore[arg-type]


async def test_daemon_serves_on_a_socket_of_its_own(vdev_daemon) -> None:
    daemon = await vdev_daemon("blk", "--backend", "ram", "--size", "16M")
    assert daemon.socket.is_socket() and daemon.process.poll() is None
    async with Frontend.connect(daemon.socket) as fe:
        await fe.negotiate()
        assert capacity(await fe.get_config(0, CONFIG.size)) == 16 * MiB
    assert await daemon.stop() == 0
    assert not daemon.socket.exists()


async def test_daemon_waits_for_every_socket_of_a_config(vdev_daemon, tmp_path: Path) -> None:
    socks = [tmp_path / f"d{n}.sock" for n in range(3)]
    config = tmp_path / "devices.toml"
    config.write_text(
        "".join(
            f'[[device]]\ntype = "blk"\nsocket = "{s}"\nbackend = "null"\nsize = "1M"\n'
            for s in socks
        )
    )
    daemon = await vdev_daemon("--config", str(config))
    assert daemon.sockets == tuple(socks)
    assert all(s.is_socket() for s in socks)


# --- seen from an inner pytest run --------------------------------------------------------


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyprojecttoml(INNER_INI)
    return pytester


MARKED = """
import pytest

@pytest.mark.requires_qemu
def test_qemu():
    pass

@pytest.mark.requires_root
def test_root():
    pass

@pytest.mark.requires_testpmd
def test_testpmd():
    pass

async def test_guest(vdev_guest):
    raise AssertionError("a test using vdev_guest must not run without QEMU")

def test_unmarked():
    pass
"""
MISSING = [
    "*qemu-system-x86_64 not installed (Debian package qemu-system-x86)*",
    "*needs root (TAP devices, network namespaces)*",
    "*dpdk-testpmd not installed (apt-get install dpdk-dev*",
]


@pytest.fixture
def nothing_installed(inner, monkeypatch, tmp_path: Path) -> pytest.Pytester:
    """No QEMU or testpmd on PATH, and not root, for the inner run (in this process)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    inner.makepyfile(MARKED)
    return inner


def test_missing_requirements_skip_with_their_reasons(nothing_installed) -> None:
    result = nothing_installed.runpytest("-p", "no:faulthandler", "-rs")
    result.assert_outcomes(passed=1, skipped=4)
    result.stdout.fnmatch_lines(MISSING, consecutive=False)


def test_require_all_turns_the_skips_into_failures(nothing_installed) -> None:
    result = nothing_installed.runpytest("-p", "no:faulthandler", "--vdev-require-all")
    result.assert_outcomes(passed=1, errors=4)
    result.stdout.fnmatch_lines(["*requires_qemu: qemu-system-x86_64 not installed*"])
    result.stdout.fnmatch_lines(["*requires_root: needs root*--vdev-require-all*"])
    assert "must not run" not in result.stdout.str()


@pytest.mark.requires_qemu
def test_a_met_requirement_runs_the_test(inner) -> None:
    inner.makepyfile("import pytest\n\n@pytest.mark.requires_qemu\ndef test_it():\n    pass\n")
    inner.runpytest("-p", "no:faulthandler", "--vdev-require-all").assert_outcomes(passed=1)


def test_markers_are_registered(inner) -> None:
    result = inner.runpytest("-p", "no:faulthandler", "--markers")
    for marker in ("requires_qemu", "requires_root", "requires_testpmd"):
        result.stdout.fnmatch_lines([f"@pytest.mark.{marker}:*"])


def test_a_daemon_that_dies_fails_the_test_with_its_log(inner) -> None:
    inner.makepyfile(
        f"""
        import os, signal

        async def test_killed(vdev_daemon):
            daemon = await vdev_daemon("blk", "--backend", "null", "--size", "1M")
            os.kill(daemon.process.pid, signal.{signal.SIGKILL.name})
            await daemon.process.wait()
        """
    )
    result = inner.runpytest("-p", "no:faulthandler")
    result.assert_outcomes(failed=1)  # pytest-trio: fixture teardown is part of the test
    result.stdout.fnmatch_lines(["*vdev run died during the test (status -9); its log*"])


def test_a_daemon_the_test_kills_itself_is_not_reported(inner) -> None:
    inner.makepyfile(
        f"""
        import signal

        async def test_kill_9(vdev_daemon):
            daemon = await vdev_daemon("blk", "--backend", "null", "--size", "1M")
            assert await daemon.stop(signal.{signal.SIGKILL.name}) == -9
        """
    )
    result = inner.runpytest("-p", "no:faulthandler")
    result.assert_outcomes(passed=1)


def test_a_daemon_refusing_its_options_fails_the_test_with_its_log(inner) -> None:
    inner.makepyfile(
        """
        async def test_bad_backend(vdev_daemon):
            await vdev_daemon("blk", "--backend", "no-such-backend")
        """
    )
    result = inner.runpytest("-p", "no:faulthandler")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*vdev run exited (status 2) before serving*", "*no-such-backend*"]
    )
    assert "on SIGTERM" not in result.stdout.str()  # reported once, not again at teardown


def test_a_bad_config_file_is_named(inner) -> None:
    inner.makepyfile(
        """
        async def test_bad_config(vdev_daemon, tmp_path):
            (tmp_path / "devices.toml").write_text("[[device]]\\n")
            await vdev_daemon("--config", str(tmp_path / "devices.toml"))
        """
    )
    result = inner.runpytest("-p", "no:faulthandler")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*vdev_daemon: *devices.toml: device #1: 'type'*required*"])
