"""The plugin path, end to end: a third-party package registers a device type.

examples/vdev-rng is pip-installed (without dependencies) into a temporary directory
and put on PYTHONPATH; vdev must then list it, serve it, and a
real guest must read entropy from it through QEMU's vhost-user-rng-pci.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from vdev.testing.frontend import Frontend

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vdev-rng"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    return env


def vdev(env, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "vdev.cli", *args], env=env, **kwargs)


def test_listed_with_its_distribution(plugin_env):
    proc = vdev(plugin_env, "backends", stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    row = next(line for line in out.splitlines() if " rng " in line)
    assert row.split()[:3] == ["device", "rng", "vdev-rng"]


async def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None, "vdev exited early"
        assert time.monotonic() < deadline, "socket never appeared"
        await trio.sleep(0.05)


async def test_served_to_a_front_end(plugin_env, tmp_path):
    sock = tmp_path / "rng.sock"
    proc = vdev(plugin_env, "run", "rng", "--socket", str(sock))
    try:
        await _wait_for(sock, proc)
        async with Frontend.connect(sock) as fe:
            await fe.negotiate()
            q = await fe.setup_queue(0)
            a = await q.transact([], [64])
            b = await q.transact([], [64])
            assert a.written == b.written == 64 and a.data != b.data
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
async def test_real_guest_reads_hwrng(plugin_env, tmp_path):
    from vdev.testing.guest import build_guest, run_guest

    sock = tmp_path / "rng.sock"
    proc = vdev(plugin_env, "run", "rng", "--socket", str(sock))
    try:
        await _wait_for(sock, proc)
        image = await build_guest(extra_modules=["virtio-rng"])
        result = await run_guest(
            "cat /sys/devices/virtual/misc/hw_random/rng_current\n"
            "dd if=/dev/hwrng bs=64 count=4 2>/dev/null | od -An -tx1 | tr -d ' \\n' | wc -c\n",
            qemu_args=[
                "-chardev",
                f"socket,id=rng0,path={sock}",
                "-device",
                "vhost-user-rng-pci,chardev=rng0",
            ],
            image=image,
            timeout=120,
        )
        lines = result.output.split()
        assert result.exit_code == 0, result.console
        assert lines[0].startswith("virtio_rng"), result.output
        assert lines[1] == "512", result.output  # 256 bytes as hex
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
