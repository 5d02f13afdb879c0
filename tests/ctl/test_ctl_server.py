"""The control server in this process, over real sockets, with a real front-end
(vdev.testing's) driving the disk it reports on."""

from __future__ import annotations

import os
from pathlib import Path

import trio
from ctl_helpers import SECTOR, Replies, ask, connect, controlled, read, transact, write
from vdev_backends.blk_ram import RamBackend

from vdev.ctl.protocol import MAX_LINE
from vdev.ctl.server import default_control_path, name_devices
from vdev.devices.base import Device
from vdev.devices.blk import CONFIG, BlkDevice, Status
from vdev.protocol import BackendRequest
from vdev.server import DeviceServer
from vdev.testing.frontend import Frontend

MiB = 1 << 20
#: Long enough for a queue worker to be asleep, waiting for a kick (it spins 50 us).
IDLE = 0.05


async def test_stats_count_what_the_front_end_sent(vdev_socket_dir: Path) -> None:
    device = BlkDevice(RamBackend(MiB), queues=2)
    async with (
        controlled(device, vdev_socket_dir) as (server, control),
        Frontend.connect(server.path) as fe,
    ):
        [idle] = (await ask(control.path, {"cmd": "list"}))["devices"]
        assert (idle["name"], idle["connected"], idle["features"]["hex"]) == ("disk0", True, "0x0")
        assert [q["enabled"] for q in idle["queues"]] == [False, False]
        await fe.negotiate()
        q0, q1 = await fe.setup_queue(0), await fe.setup_queue(1)
        for n in range(5):
            await trio.sleep(IDLE if n == 0 else 0)  # the worker sleeps: this one kicks
            assert await transact(q0, write(8 * n, os.urandom(4096))) == Status.OK
        for n in range(3):
            assert await transact(q0, read(8 * n)) == Status.OK
        for n in range(2):
            await trio.sleep(IDLE if n == 0 else 0)
            assert await transact(q1, read(8 * n)) == Status.OK
        assert await transact(q1, read(MiB // SECTOR)) == Status.IOERR  # past the end

        reply = await ask(control.path, {"cmd": "stats", "device": "disk0"})
        [disk] = reply["devices"]
        counters = disk["counters"]
        assert counters["requests"] == 11
        assert (counters["out_requests"], counters["in_requests"]) == (5, 6)
        assert counters["bytes_written"] == counters["bytes_read"] == 5 * 4096
        assert counters["errors"] == 1
        assert disk["connected"] and disk["sessions"] == 1 and disk["in_flight"] == 0
        assert "VERSION_1" in disk["features"]["names"]
        assert int(disk["features"]["hex"], 16) == fe.features
        assert {"REPLY_ACK", "CONFIG", "BACKEND_REQ"} <= set(disk["protocol_features"]["names"])
        assert disk["domain"] is None
        first, second = disk["queues"]
        assert (first["index"], first["requests"], second["requests"]) == (0, 8, 3)
        assert (second["errors"], second["bytes_read"]) == (1, 2 * 4096)
        for queue, sent in ((first, 8), (second, 3)):
            assert queue["size"] == 64 and queue["enabled"] and queue["failure"] is None
            assert 1 <= queue["kicks"] <= sent and 1 <= queue["notifies"] <= sent
            assert queue["resubmitted"] == 0

        listed = (await ask(control.path, {"cmd": "list"}))["devices"]
        assert "counters" not in listed[0] and "kicks" not in listed[0]["queues"][0]
        assert listed[0]["connected"] and len(listed[0]["queues"]) == 2


async def test_polls_that_found_work_are_counted(vdev_socket_dir: Path) -> None:
    """The worker's spin grows while its sleeps are short but longer than the spin
    (QEMU's rule): requests 20 ms apart grow it past 10 ms, and then requests 1 ms
    apart are found spinning, without a kick."""
    device = BlkDevice(RamBackend(MiB))
    async with (
        controlled(device, vdev_socket_dir, poll_max=0.5) as (server, control),
        Frontend.connect(server.path) as fe,
    ):
        await fe.negotiate()
        queue = await fe.setup_queue(0)
        for gap, count in ((0.02, 16), (0.001, 10)):
            for n in range(count):
                assert await transact(queue, read(n)) == Status.OK
                await trio.sleep(gap)
        [disk] = (await ask(control.path, {"cmd": "stats"}))["devices"]
        [counted] = disk["queues"]
        assert counted["polls"] >= 1 and counted["kicks"] >= 1
        assert counted["kicks"] + counted["polls"] <= 26


async def test_resize_through_the_control_socket_reaches_the_front_end(
    vdev_socket_dir: Path,
) -> None:
    device = BlkDevice(RamBackend(MiB))
    async with (
        controlled(device, vdev_socket_dir) as (server, control),
        Frontend.connect(server.path) as fe,
    ):
        await fe.negotiate()
        queue = await fe.setup_queue(0)
        last = 4 * MiB // SECTOR - 8
        assert await transact(queue, read(last)) == Status.IOERR

        reply = await ask(control.path, {"cmd": "resize", "device": "disk0", "size": "4M"})
        assert reply == {"ok": True, "device": "disk0", "size": 4 * MiB, "notified": True}
        [msg] = fe.backend_requests
        assert msg.request is BackendRequest.CONFIG_CHANGE_MSG
        config = await fe.get_config(0, CONFIG.size)
        assert int.from_bytes(config[:8], "little") == 4 * MiB // SECTOR
        assert await transact(queue, read(last)) == Status.OK

        for request, why in [
            ({"cmd": "resize", "device": "disk0", "size": 1000}, "not a positive number"),
            ({"cmd": "resize", "device": str(server.path), "size": "100"}, "512-byte blocks"),
            ({"cmd": "resize", "device": "disk1", "size": "8M"}, "unknown device 'disk1'"),
            ({"cmd": "link", "device": "disk0", "up": False}, "has no link"),
        ]:
            reply = await ask(control.path, request)
            assert reply["ok"] is False and why in reply["error"], reply
        assert len(fe.backend_requests) == 1  # a refused change tells nobody
        assert device.backend.size == 4 * MiB


async def test_hostile_clients_change_nothing(vdev_socket_dir: Path) -> None:
    device = BlkDevice(RamBackend(MiB))
    async with (
        controlled(device, vdev_socket_dir, line_timeout=0.5, max_clients=60) as (server, ctl),
        Frontend.connect(server.path) as fe,
    ):
        await fe.negotiate()
        queue = await fe.setup_queue(0)
        assert await transact(queue, write(0, b"k" * 4096)) == Status.OK
        before = (await ask(ctl.path, {"cmd": "stats"}))["devices"][0]

        # Garbage, one bad request after another on one connection: one error each.
        stream = await connect(ctl.path)
        async with stream:
            bad = [
                b"garbage",
                b"{",
                b"[]",
                b'{"cmd": "rm -rf"}',
                b'{"cmd": "list", "x": 1}',
                b'{"cmd": "resize", "device": "disk0", "size": false}',
                b'{"cmd": "resize", "device": "nope", "size": "2M"}',
                b"\x00\xff" * 100,
            ]
            await stream.send_all(b"\n".join(bad) + b"\n")
            replies = Replies(stream)
            for _ in bad:
                reply = await replies.reply()
                assert reply["ok"] is False and reply["error"]
            await stream.send_all(b'{"cmd": "list"}\n')  # and the connection still works
            assert (await replies.reply())["ok"] is True

        # A line over the limit: an error, then the connection is closed.
        stream = await connect(ctl.path)
        async with stream:
            await stream.send_all(b"x" * (MAX_LINE + 10))
            replies = Replies(stream)
            reply = await replies.reply()
            assert reply["ok"] is False and "longer than" in reply["error"]
            assert await replies.line() == b""

        async with trio.open_nursery() as nursery:
            # A client that never finishes its line: told, then closed.
            async def unfinished() -> None:
                stream = await connect(ctl.path)
                async with stream:
                    await stream.send_all(b'{"cmd": "list"')
                    replies = Replies(stream)
                    assert "unfinished" in (await replies.reply())["error"]
                    assert await replies.line() == b""

            nursery.start_soon(unfinished)

            # 50 clients at once (each connected before any asks), while I/O goes on.
            streams = [await connect(ctl.path) for _ in range(50)]

            async def client(stream: trio.SocketStream, n: int) -> None:
                async with stream:
                    await stream.send_all(b'{"cmd": "stats", "device": "disk0"}\n')
                    reply = await Replies(stream).reply()
                    assert reply["ok"] and reply["devices"][0]["name"] == "disk0"

            for n, stream in enumerate(streams):
                nursery.start_soon(client, stream, n)
            assert await transact(queue, read(0)) == Status.OK

        # Beyond max_clients: told so, the others unaffected.
        held = [await connect(ctl.path) for _ in range(60)]
        with trio.fail_after(10):
            while ctl.clients < 60:
                await trio.sleep(0.01)
        refused = await connect(ctl.path)
        async with refused:
            assert "too many control clients" in (await Replies(refused).reply())["error"]
        for stream in held:
            await stream.aclose()

        after = (await ask(ctl.path, {"cmd": "stats"}))["devices"][0]
        assert after["counters"]["requests"] == before["counters"]["requests"] + 1
        assert device.backend.size == MiB and fe.backend_requests == []
        assert await transact(queue, read(0)) == Status.OK


async def test_a_line_trickling_in_is_cut_off(vdev_socket_dir: Path) -> None:
    """The time limit covers the whole line, not each byte of it."""
    device = BlkDevice(RamBackend(MiB))
    async with controlled(device, vdev_socket_dir, line_timeout=0.5) as (_, control):
        stream = await connect(control.path)
        async with stream:
            replies = Replies(stream)
            with trio.fail_after(5):
                for byte in b'{"cmd": "list"' * 100:
                    try:
                        await stream.send_all(bytes([byte]))
                    except trio.BrokenResourceError:
                        break
                    await trio.sleep(0.05)
            assert "unfinished after 0.5s" in (await replies.reply())["error"]
            assert await replies.line() == b""


class BrokenStatsDisk(BlkDevice):
    def stats(self) -> dict[str, int]:
        raise RuntimeError("a bug")


async def test_an_internal_error_is_an_error_reply(vdev_socket_dir: Path) -> None:
    async with controlled(BrokenStatsDisk(RamBackend(MiB)), vdev_socket_dir) as (_, control):
        reply = await ask(control.path, {"cmd": "stats"})
        assert reply == {
            "ok": False,
            "error": "internal error (RuntimeError: a bug); see the daemon's log",
        }
        assert (await ask(control.path, {"cmd": "list"}))["ok"]


def test_devices_are_named_after_their_sockets() -> None:
    paths = ["/run/a/disk.sock", "/run/b/disk.sock", "/run/nic0.sock", "rel/x"]
    servers = [DeviceServer(Device(), path) for path in paths]
    named = name_devices([("blk", s) for s in servers])
    assert [(d.name, d.server) for d in named] == [
        ("/run/a/disk.sock", servers[0]),  # two sockets called disk.sock: their paths
        ("/run/b/disk.sock", servers[1]),
        ("nic0", servers[2]),
        ("x", servers[3]),
    ]
    assert default_control_path(Path("/run/nic0.sock")) == Path("/run/nic0.sock.ctl")
