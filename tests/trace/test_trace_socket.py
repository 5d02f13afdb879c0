"""`vdev trace` over real sockets: vdev.testing's Frontend -> tracer -> a DeviceServer.

The device must work through the tracer as it does directly, the trace must show what
was said, garbage from either side must be reported without ending the tracer, and
`vdev run --trace` must log the daemon's own sessions.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from trace_helpers import use_disk
from vdev_backends.blk_ram import RamBackend

from vdev.devices.blk import BlkDevice
from vdev.fdpass import recv_message, send_with_fds
from vdev.protocol import BackendRequest, HeaderFlag, Request
from vdev.protocol.framing import HEADER, encode_message
from vdev.protocol.messages import U64
from vdev.server import DeviceServer
from vdev.testing.frontend import Frontend, serve_device
from vdev.trace import TraceOptions, Tracer
from vdev.trioutil import unwrap_single

SIZE = 1 << 20


@asynccontextmanager
async def tracing(
    tmp_path: Path, backend: Path, **options: object
) -> AsyncIterator[tuple[Path, Tracer, io.StringIO]]:
    """A tracer listening on tmp_path/trace.sock, writing into a StringIO."""
    out = io.StringIO()
    listen = tmp_path / "trace.sock"
    tracer = Tracer(TraceOptions(listen, backend, out, **options))  # type: ignore[arg-type]
    await tracer.check_backend()
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(tracer.serve)
            try:
                yield listen, tracer, out
            finally:
                nursery.cancel_scope.cancel()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def wait_for(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.01)


async def test_a_device_works_through_the_tracer_and_the_trace_shows_the_session(
    tmp_path: Path,
) -> None:
    device = BlkDevice(RamBackend(SIZE))
    async with serve_device(device, tmp_path / "blk.sock") as backend:
        fds_before = open_fds()
        async with (
            tracing(tmp_path, backend, device="blk") as (listen, _tracer, out),
            Frontend.connect(listen) as fe,
        ):
            assert await use_disk(fe) == bytes(range(256)) * 2
            base = await fe.stop_queue(0)
            first = fe.memory.regions[0]
        await wait_for(lambda: open_fds() == fds_before)  # the session's, the tracer's
    lines = out.getvalue().splitlines()
    assert all(line.startswith("#1 +") for line in lines)
    assert lines[0] == "#1 +? front-end -> back-end SET_OWNER"
    assert lines[1].endswith(" front-end -> back-end GET_FEATURES")
    [offered] = [line for line in lines if "back-end -> front-end GET_FEATURES [REPLY]" in line]
    assert "VERSION_1" in offered and "PROTOCOL_FEATURES" in offered and "FLUSH" in offered
    [table] = [line for line in lines if "back-end SET_MEM_TABLE" in line]
    assert f"regions=[guest_addr={first.guest_phys_addr:#x} size={first.size:#x}" in table
    assert "fds=2:" in table
    [addr] = [line for line in lines if "back-end SET_VRING_ADDR" in line]
    assert "index=0" in addr and "desc=0x7f" in addr
    assert any("back-end SET_VRING_KICK" in line and "fds=1:" in line for line in lines)
    [vring_base] = [line for line in lines if "GET_VRING_BASE [REPLY]" in line]
    assert f"base={base}" in vring_base
    assert not any("ERROR" in line for line in lines), "\n".join(lines)


async def test_json_lines_and_the_request_filter(tmp_path: Path) -> None:
    device = BlkDevice(RamBackend(SIZE))
    only = frozenset({"SET_MEM_TABLE", "GET_FEATURES"})
    async with (
        serve_device(device, tmp_path / "blk.sock") as backend,
        tracing(tmp_path, backend, json=True, only=only) as (listen, _tracer, out),
        Frontend.connect(listen) as fe,
    ):
        await use_disk(fe)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["request"], r["direction"]) for r in records] == [
        ("GET_FEATURES", "front-end -> back-end"),
        ("GET_FEATURES", "back-end -> front-end"),
        ("SET_MEM_TABLE", "front-end -> back-end"),
        ("SET_MEM_TABLE", "back-end -> front-end"),
    ]
    request, reply, table, ack = records
    assert request["connection"] == 1 and request["flags"] == []
    assert "VERSION_1" in reply["fields"]["features"]["names"] and reply["flags"] == ["REPLY"]
    assert len(table["fds"]) == 2 and len(table["fields"]["regions"]) == 2
    assert table["flags"] == ["NEED_REPLY"] and ack["fields"] == {"ack": "ok"}
    assert all(r["elapsed"] >= 0 for r in records)


async def test_front_ends_in_turn_each_get_a_backend_connection(tmp_path: Path) -> None:
    device = BlkDevice(RamBackend(SIZE))
    server = DeviceServer(device, tmp_path / "blk.sock")
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            async with tracing(tmp_path, server.path) as (listen, tracer, out):
                for _ in range(3):
                    async with Frontend.connect(listen) as fe:
                        await use_disk(fe)
                assert tracer.connections == 3
                await wait_for(lambda: server.sessions == 4)  # and check_backend's probe
            nursery.cancel_scope.cancel()
    numbers = {line.split()[0] for line in out.getvalue().splitlines()}
    assert numbers == {"#1", "#2", "#3"}


async def raw_connection(path: Path) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    return sock


async def read_until_closed(sock: trio.socket.SocketType) -> bytes:
    data = b""
    with trio.fail_after(10):
        while chunk := await sock.recv(65536):
            data += chunk
    return data


async def test_front_end_garbage_is_reported_and_the_tracer_keeps_serving(tmp_path: Path) -> None:
    device = BlkDevice(RamBackend(SIZE))
    async with (
        serve_device(device, tmp_path / "blk.sock") as backend,
        tracing(tmp_path, backend) as (listen, _tracer, out),
    ):
        with await raw_connection(listen) as sock:
            owner = encode_message(Request.SET_OWNER, HeaderFlag.VERSION)
            unknown = encode_message(99, HeaderFlag.VERSION, b"\x01")
            oversize = HEADER.pack(Request.GET_FEATURES, HeaderFlag.VERSION, 1 << 20)
            await sock.send(owner + unknown + oversize)
            await read_until_closed(sock)  # the tracer closes the pair
        async with Frontend.connect(listen) as fe:
            await use_disk(fe)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("#1 +? front-end -> back-end SET_OWNER")
    assert lines[1].endswith(
        f" UNKNOWN(99) ERROR: unknown request on the main channel; raw={unknown.hex()}"
    )
    assert "GET_FEATURES ERROR: framing lost: payload size 1048576 exceeds 4096" in lines[2]
    assert any(line.startswith("#2 ") and "SET_MEM_TABLE" in line for line in lines)


@asynccontextmanager
async def fake_backend(path: Path, reply: bytes) -> AsyncIterator[None]:
    """A back-end that answers each connection's first message with `reply` and hangs up."""

    async def serve(task_status: trio.TaskStatus[None]) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with listener:
            await listener.bind(str(path))
            listener.listen(4)
            task_status.started()
            while True:
                conn, _ = await listener.accept()
                with conn:
                    if await conn.recv(4096):
                        await conn.send(reply)

    with unwrap_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            yield
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (encode_message(Request.GET_FEATURES, HeaderFlag.VERSION | HeaderFlag.REPLY, b"\x01"),
         "GET_FEATURES [REPLY] ERROR: payload is 1 bytes, expected 8"),
        (HEADER.pack(Request.GET_FEATURES, 5, 99999), "framing lost: payload size 99999"),
        (b"\x01\x00", "GARBAGE ERROR: stream ended inside a message (2 bytes)"),
    ],
)  # fmt: skip
async def test_back_end_garbage_is_forwarded_and_reported(
    tmp_path: Path, reply: bytes, error: str
) -> None:
    async with (
        fake_backend(tmp_path / "fake.sock", reply),
        tracing(tmp_path, tmp_path / "fake.sock") as (listen, _tracer, out),
    ):
        with await raw_connection(listen) as sock:
            await sock.send(encode_message(Request.GET_FEATURES, HeaderFlag.VERSION))
            assert await read_until_closed(sock) == reply
    [line] = [line for line in out.getvalue().splitlines() if "back-end -> front-end" in line]
    assert error in line
    assert line.endswith(f"raw={reply.hex()}")


async def test_fds_reach_the_back_end_with_their_own_message(tmp_path: Path) -> None:
    """Messages queued back to back, only the second with an fd: one read of both would
    hand the fd over with the first."""
    received: list[tuple[bytes, list[int]]] = []
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(tmp_path / "b.sock"))
    listener.listen(4)
    owner = encode_message(Request.SET_OWNER, HeaderFlag.VERSION)
    call = encode_message(Request.SET_VRING_CALL, HeaderFlag.VERSION, U64.pack(0))
    async with tracing(tmp_path, tmp_path / "b.sock") as (listen, _tracer, out):
        (await listener.accept())[0].close()  # check_backend's probe
        front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        front.connect(str(listen))
        back, _ = await listener.accept()
        eventfd = os.eventfd(0)
        front.sendall(owner)  # both queued before the tracer reads: no checkpoint between
        socket.send_fds(front, [call], [eventfd])
        with back, front, trio.fail_after(10):
            while len(received) < 2:
                data, fds, _ = await recv_message(back)
                received.append((data, fds))
        os.close(eventfd)
    listener.close()
    assert [data for data, _ in received] == [owner, call]
    assert len(received[0][1]) == 0 and len(received[1][1]) == 1
    for fd in received[1][1]:
        os.close(fd)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(" SET_OWNER")
    assert " SET_VRING_CALL index=0 fd=True fds=1:" in lines[1]


async def test_the_back_end_channel_is_traced_too(tmp_path: Path) -> None:
    """SET_BACKEND_REQ_FD's socket: the back-end's requests and the front-end's replies on
    it are forwarded unchanged and traced as the back-end channel."""
    fds_before = open_fds()
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(tmp_path / "b.sock"))
    listener.listen(4)
    need_reply = HeaderFlag.VERSION | HeaderFlag.NEED_REPLY
    reply = HeaderFlag.VERSION | HeaderFlag.REPLY
    handover = encode_message(Request.SET_BACKEND_REQ_FD, need_reply)
    change = encode_message(BackendRequest.CONFIG_CHANGE_MSG, need_reply)
    ack = encode_message(BackendRequest.CONFIG_CHANGE_MSG, reply, U64.pack(0))
    async with tracing(tmp_path, tmp_path / "b.sock") as (listen, _tracer, out):
        (await listener.accept())[0].close()  # check_backend's probe
        front = await raw_connection(listen)
        back, _ = await listener.accept()
        front_end, back_end = socket.socketpair()
        with front, back, front_end, trio.fail_after(10):
            await send_with_fds(front, handover, [back_end.fileno()])
            back_end.close()
            data, fds, _ = await recv_message(back)
            assert data == handover and len(fds) == 1
            with (
                trio.socket.from_stdlib_socket(socket.socket(fileno=fds[0])) as channel,
                trio.socket.from_stdlib_socket(front_end) as front_channel,
            ):
                await send_with_fds(channel, change)
                assert (await recv_message(front_channel))[0] == change
                await send_with_fds(front_channel, ack)
                assert (await recv_message(channel))[0] == ack
    listener.close()
    assert open_fds() == fds_before  # the tracer's ends of the channel are closed too
    lines = out.getvalue().splitlines()
    assert " front-end -> back-end SET_BACKEND_REQ_FD [NEED_REPLY] fds=1:" in lines[0]
    assert lines[1].endswith(
        " back-end -> front-end [back-end channel] CONFIG_CHANGE_MSG [NEED_REPLY]"
    )
    assert lines[2].endswith(
        " front-end -> back-end [back-end channel] CONFIG_CHANGE_MSG [REPLY] ack=ok"
    )


async def test_an_unreachable_back_end_drops_the_front_end_only(tmp_path: Path) -> None:
    device = BlkDevice(RamBackend(SIZE))
    server = DeviceServer(device, tmp_path / "blk.sock")
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def serve(task_status: trio.TaskStatus[None]) -> None:
                with scope:
                    await server.serve(task_status=task_status)

            await nursery.start(serve)
            async with tracing(tmp_path, server.path) as (listen, tracer, _out):
                scope.cancel()  # the back-end goes away
                await wait_for(lambda: not server.path.exists())
                with await raw_connection(listen) as sock:
                    assert await read_until_closed(sock) == b""
                await nursery.start(server.serve)
                async with Frontend.connect(listen) as fe:
                    await use_disk(fe)
                assert tracer.connections == 2
            nursery.cancel_scope.cancel()


async def test_vdev_run_trace_logs_each_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = BlkDevice(RamBackend(SIZE))
    server = DeviceServer(device, tmp_path / "blk.sock", trace=True)
    with caplog.at_level(logging.INFO, logger="vdev.protocol.describe"), unwrap_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            async with Frontend.connect(server.path) as fe:
                await use_disk(fe)
                await fe.sock.send(encode_message(Request.SET_FEATURES, 1, b"\x01"))
                await read_until_closed(fe.sock)
            nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.name == "vdev.protocol.describe"]
    prefix = f"{server.path}: "
    assert all(line.startswith(prefix) for line in lines)
    assert lines[0] == prefix + "+? front-end -> back-end SET_OWNER"
    assert any("back-end -> front-end GET_FEATURES [REPLY] features=" in line for line in lines)
    assert any(" SET_MEM_TABLE [NEED_REPLY] regions=[" in line for line in lines)
    assert "SET_FEATURES ERROR: payload is 1 bytes, expected 8" in lines[-1]
