"""The `vdev` command line, run as a real subprocess where it matters."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import trio

from vdev.cli import main
from vdev.testing.frontend import Frontend

VDEV = [sys.executable, "-m", "vdev.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VDEV, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["run", "blk", "--socket", "s", "--backend", "ram", "--queues", "0"], "--queues"),
        (["run", "blk", "--socket", "s", "--backend", "nope"], "nope"),
        (["run", "blk", "--backend", "ram", "--size", "1M"], "--socket"),
        (["run", "blk", "--socket", "s", "--backend", "ram", "--size", "lots"], "size"),
        (["run", "blk", "--socket", "s", "--backend", "ram", "--size", "1M", "--tap", "x"], "tap"),
        (
            ["run", "blk", "--socket", "s", "--backend", "file", "--path", "/nonexistent"],
            "/nonexistent",
        ),
        (["run", "--config", "/nonexistent.toml"], "/nonexistent.toml"),
        (["run", "blk", "--socket", "s", "--backend", "ram", "--domain-user", "x"], "driver"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, names, tmp_path):
    result = subprocess.run(
        [*VDEV, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_file(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    for text, expect in [
        ("this is not toml", "bad.toml"),
        ("[[device]]\ntype = 'blk'\n", "'socket'"),
        ("[[device]]\ntype='blk'\nsocket='a'\nbackend='ram'\nsize='1M'\nbogus=1\n", "bogus"),
        (
            "[[device]]\ntype='blk'\nsocket='a'\nbackend='ram'\nsize='1M'\ndomain='elsewhere'\n",
            "domain",
        ),
    ]:
        config.write_text(text)
        assert main(["run", "--config", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err


def test_backends_lists_builtins(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in ("blk", "net", "file", "ram", "null", "tap", "echo", "switch"):
        assert f" {name} " in out
    assert "vdev_backends.blk_file:FileBackend" in out


def test_qemu_args_renders_templates(capsys):
    assert main(["qemu-args", "blk", "--socket", "/tmp/d.sock", "--mem", "2G"]) == 0
    out = capsys.readouterr().out
    assert "memory-backend-memfd,id=mem,size=2G,share=on" in out
    assert "path=/tmp/d.sock" in out and "vhost-user-blk-pci" in out


async def test_run_serves_then_sigterm_exits_0(vdev_daemon):
    daemon = await vdev_daemon("blk", "--backend", "ram", "--size", "4M")
    assert oct(daemon.socket.stat().st_mode & 0o777) == "0o600"
    async with Frontend.connect(daemon.socket) as fe:
        await fe.negotiate()
        q = await fe.setup_queue(0)
        header = (1).to_bytes(4, "little") + bytes(4) + (0).to_bytes(8, "little")
        used = await q.transact([header, b"x" * 512], [1])  # OUT sector 0
        assert used.data == [b"\0"]
    assert await daemon.stop() == 0
    assert not daemon.socket.exists()
    assert "Traceback" not in daemon.log_text()


async def test_client_mode_connects_to_front_end(vdev_daemon, vdev_socket_dir):
    """--client: vdev connects out (QEMU server=on); retries until the socket exists."""
    import socket as pysocket

    from vdev.testing.fakemem import FakeGuestMemory

    path = vdev_socket_dir / "fe.sock"
    daemon = await vdev_daemon(
        "blk", "--client", "--socket", str(path), "--backend", "null", "--size", "1M"
    )
    await trio.sleep(0.3)  # vdev is retrying: nobody listens yet
    listener = trio.socket.socket(pysocket.AF_UNIX)
    await listener.bind(str(path))
    listener.listen(1)
    with trio.fail_after(20):
        sock, _ = await listener.accept()
    memory = FakeGuestMemory(4 << 20, memfd=True)
    fe = Frontend(sock, memory)
    await fe.negotiate()
    msg = await fe.get_config(0, 8)
    assert int.from_bytes(msg, "little") == 2048  # capacity in sectors
    fe.close()
    sock.close()
    listener.close()
    memory.close()
    assert await daemon.stop(signal.SIGINT) == 0


def test_a_reader_that_goes_away_is_not_an_error() -> None:
    """`vdev backends | head -0`: the pipe closes before vdev writes."""
    proc = subprocess.Popen([*VDEV, "backends"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # type: ignore[union-attr]
    stderr = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert proc.wait(timeout=60) == 0, stderr
    assert stderr == ""
