"""`vdev trace` and `vdev run --trace` as real subprocesses: output, signals, bad options."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio
from trace_helpers import use_disk

from vdev.bench.core import daemon
from vdev.protocol import HeaderFlag, Request
from vdev.protocol.framing import encode_message
from vdev.testing.frontend import Frontend

VDEV = [sys.executable, "-m", "vdev.cli"]


async def test_trace_prints_to_stdout_and_run_trace_logs_the_session(tmp_path: Path) -> None:
    disk, traced = tmp_path / "disk.sock", tmp_path / "trace.sock"
    run = [*VDEV, "run", "blk", "--socket", str(disk), "--backend", "ram", "--size", "1M"]
    trace = [*VDEV, "trace", "--listen", str(traced), "--connect", str(disk)]
    run_log, trace_out = tmp_path / "run.log", tmp_path / "trace.out"
    async with daemon([*run, "--trace"], disk, run_log), daemon(trace, traced, trace_out) as tracer:
        async with Frontend.connect(traced) as fe:
            await use_disk(fe)
        tracer.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await tracer.wait() == 0
    assert not traced.exists()
    printed = [line for line in trace_out.read_text().splitlines() if line.startswith("#")]
    logged = [line for line in run_log.read_text().splitlines() if "vdev.protocol.describe" in line]
    assert printed[0] == "#1 +? front-end -> back-end SET_OWNER"
    assert any(" SET_MEM_TABLE [NEED_REPLY] regions=[" in line for line in printed)
    # The daemon saw the same messages (the tracer's probe connection sent none).
    assert [comparable(line.split(f"{disk}: ", 1)[1]) for line in logged] == [
        comparable(line.split(" ", 1)[1]) for line in printed
    ]


def comparable(text: str) -> str:
    """A record's text without its time and fd numbers (each process has its own)."""
    return re.sub(r"fds=(\d+):[\d,]+", r"fds=\1", text.split(" ", 1)[1])


def test_trace_cli_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("")
    backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    backend.bind(str(tmp_path / "b.sock"))
    backend.listen(8)
    cases = [
        (["--listen", "l.sock", "--connect", "none.sock"], "none.sock"),
        (["--listen", "l.sock", "--connect", "file"], "file"),
        (["--listen", "/nonexistent/dir/l.sock", "--connect", "b.sock"], "/nonexistent/dir"),
        (["--listen", "file", "--connect", "b.sock"], "not a socket"),
        (["--listen", "b.sock", "--connect", "b.sock"], "in use"),
        (["--listen", "l.sock", "--connect", "b.sock", "--only", "SET_MEM_TABLE,FOO"], "FOO"),
        (["--listen", "l.sock", "--connect", "b.sock", "--output", "/nonexistent/x"], "--output"),
        (["--listen", "l.sock"], "--connect"),
        (["--listen", "l.sock", "--connect", "b.sock", "--device", "gpu"], "--device"),
    ]
    with backend:
        for args, names in cases:
            result = subprocess.run(
                [*VDEV, "trace", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
            )
            assert result.returncode == 2, result
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and names in lines[0], result.stderr
    assert not (tmp_path / "l.sock").exists()


async def test_a_trace_that_cannot_be_written_ends_in_one_line(tmp_path: Path) -> None:
    backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    backend.bind(str(tmp_path / "b.sock"))
    backend.listen(8)
    traced, log = tmp_path / "trace.sock", tmp_path / "trace.log"
    argv = [*VDEV, "-q", "trace", "--listen", str(traced), "--connect", str(tmp_path / "b.sock")]
    with backend:
        async with daemon([*argv, "--output", "/dev/full"], traced, log) as tracer:
            front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with front:
                front.connect(str(traced))
                front.sendall(encode_message(Request.SET_OWNER, HeaderFlag.VERSION))
                with trio.fail_after(10):
                    assert await tracer.wait() == 2
    assert log.read_text() == "vdev trace: error: cannot write the trace: No space left on device\n"
    assert not traced.exists()
