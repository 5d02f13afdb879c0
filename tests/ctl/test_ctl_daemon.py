"""`vdev ctl` against real `vdev run` daemons (subprocesses), with a real front-end
(vdev.testing's) doing I/O on the disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
from ctl_helpers import SECTOR, Replies, ask, connect, read, transact, write

from vdev.ctl.protocol import MAX_LINE
from vdev.devices.blk import CONFIG, Status
from vdev.protocol import BackendRequest
from vdev.testing.frontend import Frontend

VDEV = [sys.executable, "-m", "vdev.cli"]
MiB = 1 << 20


def image(path: Path, size: int = MiB) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


async def vdev_ctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*VDEV, "ctl", *args], capture_stdout=True, capture_stderr=True, check=False
    )


async def ctl_json(*args: str) -> dict[str, Any]:
    result = await vdev_ctl(*args, "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert isinstance(reply, dict)
    return reply


async def test_vdev_ctl_reports_and_resizes_a_served_disk(tmp_path: Path, vdev_daemon) -> None:
    disk = image(tmp_path / "disk.img")
    daemon = await vdev_daemon("blk", "--backend", "file", "--path", str(disk))
    sock = str(daemon.socket)
    control = Path(sock + ".ctl")
    assert stat.S_IMODE(control.stat().st_mode) == 0o600
    name = daemon.socket.stem

    idle = (await ctl_json("--socket", sock, "list"))["devices"]
    assert [(d["name"], d["connected"], d["sessions"]) for d in idle] == [(name, False, 0)]

    async with Frontend.connect(daemon.socket) as fe:
        await fe.negotiate()
        queue = await fe.setup_queue(0)
        await trio.sleep(0.05)  # the worker is asleep: the first request kicks
        for n in range(7):
            assert await transact(queue, write(8 * n, os.urandom(4096))) == Status.OK
        for n in range(4):
            assert await transact(queue, read(8 * n)) == Status.OK

        [stats] = (await ctl_json("--control", str(control), "stats", name))["devices"]
        assert stats["counters"]["requests"] == 11
        assert stats["counters"]["bytes_written"] == 7 * 4096
        assert stats["counters"]["bytes_read"] == 4 * 4096
        assert stats["counters"]["errors"] == 0
        [q0] = stats["queues"]
        assert (q0["requests"], q0["in_flight"], q0["enabled"]) == (11, 0, True)
        assert 1 <= q0["kicks"] <= 11 and 1 <= q0["notifies"] <= 11
        assert stats["connected"] and stats["sessions"] == 1

        table = await vdev_ctl("--socket", sock, "list")
        assert table.returncode == 0
        header, row = table.stdout.decode().splitlines()
        assert header.split()[:3] == ["NAME", "TYPE", "FRONT-END"]
        assert row.split()[:4] == [name, "blk", "connected", "1"]

        # Resize by the socket's path (relative to us): the front-end is told.
        result = await vdev_ctl("--socket", sock, "resize", os.path.relpath(sock), "4M")
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().strip() == (
            f"{name}: resized to {4 * MiB} bytes; the front-end was told"
        )
        [msg] = await fe.wait_backend_requests(1)
        assert msg.request is BackendRequest.CONFIG_CHANGE_MSG
        config = await fe.get_config(0, CONFIG.size)
        assert int.from_bytes(config[:8], "little") == 4 * MiB // SECTOR
        assert disk.stat().st_size == 4 * MiB
        assert await transact(queue, read(4 * MiB // SECTOR - 8)) == Status.OK

        refused = await vdev_ctl("--socket", sock, "resize", name, "1000")
        assert refused.returncode == 1
        assert refused.stderr.decode().count("\n") == 1
        assert "not a positive number of 512-byte blocks" in refused.stderr.decode()
        assert disk.stat().st_size == 4 * MiB and len(fe.backend_requests) == 1


async def test_vdev_ctl_counts_frames_and_sets_a_nics_link(vdev_daemon) -> None:
    daemon = await vdev_daemon("net", "--backend", "echo", "-o", "config_space=on")
    sock, name = str(daemon.socket), daemon.socket.stem
    frames = [bytes(6) + bytes.fromhex("525400000001") + b"\x88\xb5" + bytes(50 + n)
              for n in range(3)]  # fmt: skip
    async with Frontend.connect(daemon.socket) as fe:
        await fe.negotiate()
        rx, tx = await fe.setup_queue(0), await fe.setup_queue(1)
        for _ in frames:
            rx.add([], [2048])
        rx.kick()
        for frame in frames:
            tx.add([bytes(12) + frame], [])  # a virtio-net header, then the frame
        tx.kick()
        await tx.wait_used(3)
        await rx.wait_used(3)  # the echo backend sent them back

        [nic] = (await ctl_json("--socket", sock, "stats"))["devices"]
        size = sum(len(f) for f in frames)
        assert nic["type"] == "net" and "STATUS" in nic["features"]["names"]
        assert nic["counters"]["tx_frames"] == nic["counters"]["rx_frames"] == 3
        assert nic["counters"]["tx_bytes"] == nic["counters"]["rx_bytes"] == size
        assert nic["counters"]["drops"] == 0
        assert [(q["index"], q["requests"], q["bytes"]) for q in nic["queues"]] == [
            (0, 3, size),
            (1, 3, size),
        ]

        result = await vdev_ctl("--socket", sock, "link", name, "down")
        assert result.stdout.decode().strip() == f"{name}: link down; the front-end was told"
        [msg] = await fe.wait_backend_requests(1)
        assert msg.request is BackendRequest.CONFIG_CHANGE_MSG
        _mac, status = struct.unpack_from("<6sH", await fe.get_config(0, 8))
        assert status == 0  # VIRTIO_NET_S_LINK_UP cleared


async def test_hostile_control_clients_change_nothing(tmp_path: Path, vdev_daemon) -> None:
    daemon = await vdev_daemon("blk", "--backend", "ram", "--size", "1M")
    control = Path(f"{daemon.socket}.ctl")
    async with Frontend.connect(daemon.socket) as fe:
        await fe.negotiate()
        queue = await fe.setup_queue(0)
        assert await transact(queue, write(0, b"h" * 4096)) == Status.OK
        before = (await ask(control, {"cmd": "stats"}))["devices"][0]["counters"]

        for line in [b"\xde\xad\n", b'{"cmd": "resize", "device": "x", "size": "2M"}\n',
                     b'{"cmd": "resize", "device": "vdev0", "size": "2M", "now": 1}\n',
                     b'{"cmd": "link", "device": "vdev0", "up": true}\n']:  # fmt: skip
            reply = await ask(control, line)
            assert reply["ok"] is False and reply["error"], (line, reply)

        huge = await connect(control)
        async with huge:
            await huge.send_all(b"{" * (MAX_LINE + 1))
            replies = Replies(huge)
            assert "longer than" in (await replies.reply())["error"]
            assert await replies.line() == b""

        silent = await connect(control)  # never finishes its line: blocks nobody
        await silent.send_all(b'{"cmd": "sta')
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(ask, control, {"cmd": "list"})
            for n in range(8):
                assert await transact(queue, read(n)) == Status.OK
        await silent.aclose()

        after = (await ask(control, {"cmd": "stats"}))["devices"][0]["counters"]
        assert after["requests"] == before["requests"] + 8
        assert after["bytes_written"] == before["bytes_written"]
        assert fe.backend_requests == []  # no resize, no link change reached the front-end
        config = await fe.get_config(0, CONFIG.size)
        assert int.from_bytes(config[:8], "little") == MiB // SECTOR


async def test_driver_domain_state(tmp_path: Path, vdev_daemon) -> None:
    disk = image(tmp_path / "disk.img")
    daemon = await vdev_daemon(
        "blk", "--backend", "file", "--path", str(disk), "--domain", "driver"
    )
    sock = str(daemon.socket)
    [dev] = (await ctl_json("--socket", sock, "list"))["devices"]
    domain = dev["domain"]
    assert (domain["status"], domain["restarts"], domain["memory"]) == ("serving", 0, "map")
    first = domain["pid"]
    assert Path(f"/proc/{first}/stat").read_text().split()[3] == str(daemon.process.pid)

    os.kill(first, signal.SIGKILL)
    with trio.fail_after(30):
        while True:
            [dev] = (await ctl_json("--socket", sock, "list"))["devices"]
            if dev["domain"]["restarts"] == 1 and dev["domain"]["pid"] not in (None, first):
                break
            await trio.sleep(0.1)
    assert dev["domain"]["crashes"] == 1 and dev["domain"]["status"] == "serving"
    table = (await vdev_ctl("--socket", sock, "list")).stdout.decode()
    assert f"serving pid {dev['domain']['pid']}, 1 restart" in table


async def test_ctl_errors_are_one_line(tmp_path: Path, vdev_daemon) -> None:
    daemon = await vdev_daemon("blk", "--backend", "ram", "--size", "1M")
    sock = str(daemon.socket)
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a socket file nobody listens on
    cases = [
        (["--socket", str(tmp_path / "none.sock"), "list"], 1, "no control socket"),
        (["--control", str(stale), "list"], 1, "nothing listens"),
        (["--socket", sock, "stats", "nope"], 1, "unknown device 'nope'"),
        (["--socket", sock, "link", daemon.socket.stem, "up"], 1, "has no link"),
        (["list"], 2, "--control"),
        (["--socket", sock, "--control", sock + ".ctl", "list"], 2, "--control"),
        (["--socket", sock, "resize", "x", "lots"], 2, "invalid size"),
        (["--socket", sock, "link", "x", "sideways"], 2, "sideways"),
        (["--socket", sock, "frobnicate"], 2, "frobnicate"),
    ]
    for args, status, words in cases:
        result = await vdev_ctl(*args)
        err = result.stderr.decode()
        assert result.returncode == status, (args, err)
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, (args, err)


async def test_run_control_option(tmp_path: Path, vdev_socket_dir: Path, vdev_daemon) -> None:
    mine = vdev_socket_dir / "my.ctl"
    daemon = await vdev_daemon("blk", "--backend", "ram", "--size", "1M", "--control", str(mine))
    assert (await ask(mine, {"cmd": "list"}))["ok"]
    assert not Path(f"{daemon.socket}.ctl").exists()
    await daemon.stop()
    assert not mine.exists()  # removed at exit

    none = await vdev_daemon("blk", "--backend", "ram", "--size", "1M", "--control", "none")
    assert not Path(f"{none.socket}.ctl").exists()

    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("")
    for control, words in [
        (str(not_a_socket), "not a socket"),
        ("d.sock", "device socket"),
        ("c" * 120, "AF_UNIX path too long"),
    ]:
        result = subprocess.run(
            [*VDEV, "run", "blk", "--socket", "d.sock", "--backend", "ram", "--size", "1M",
             "--control", control],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], result.stderr


async def test_one_control_socket_for_a_config_of_devices(
    tmp_path: Path, vdev_socket_dir: Path, vdev_daemon
) -> None:
    disk, nic = vdev_socket_dir / "disk.sock", vdev_socket_dir / "nic.sock"
    config = tmp_path / "devices.toml"
    config.write_text(
        f'[[device]]\ntype = "blk"\nsocket = "{disk}"\nbackend = "ram"\nsize = "1M"\n'
        f'[[device]]\ntype = "net"\nsocket = "{nic}"\nbackend = "echo"\n'
    )
    await vdev_daemon("--config", str(config))
    listed = (await ctl_json("--socket", str(disk), "list"))["devices"]
    assert [(d["name"], d["type"], d["socket"]) for d in listed] == [
        ("disk", "blk", str(disk)),
        ("nic", "net", str(nic)),
    ]
    [only] = (await ctl_json("--socket", str(disk), "stats", str(nic)))["devices"]
    assert only["name"] == "nic" and "rx_frames" in only["counters"]
    refused = await vdev_ctl("--socket", str(disk), "resize", "nic", "2M")
    assert refused.returncode == 1 and "a NetDevice cannot be resized" in refused.stderr.decode()
