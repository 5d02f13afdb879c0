"""The back-end channel over real sockets: CONFIG_CHANGE_MSG, acks, and front-ends that
break the channel (the session and the device go on)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from vdev.devices.base import Device, Queue
from vdev.protocol import BackendMessage, BackendRequest, ProtocolFeature, Request
from vdev.server import DeviceServer
from vdev.testing.frontend import Frontend, running_server

CONFIG_CHANGE = BackendRequest.CONFIG_CHANGE_MSG


class ConfigDevice(Device):
    """Echoes chains; its config space is a counter that `bump` changes."""

    device_id = 0x7E

    def __init__(self) -> None:
        super().__init__(num_queues=1)
        self.generation = 0

    def config(self) -> bytes:
        return self.generation.to_bytes(4, "little")

    def handle(self, queue: Queue) -> None:
        while (chain := queue.pop()) is not None:
            queue.push(chain, chain.write_into(b"".join(bytes(v) for v in chain.readable)))
        queue.notify()


@asynccontextmanager
async def served(
    tmp_path: Path, device: ConfigDevice | None = None
) -> AsyncIterator[tuple[DeviceServer, Frontend]]:
    """`device` (a new ConfigDevice) served on tmp_path/d.sock, and a connected front-end."""
    async with (
        running_server(device or ConfigDevice(), tmp_path / "d.sock") as server,
        Frontend.connect(server.path) as fe,
    ):
        yield server, fe


async def echo_works(fe: Frontend) -> None:
    queue = fe.queues.get(0) or await fe.setup_queue(0)
    used = await queue.transact([b"ping"], [4])
    assert used.data == [b"ping"]


async def test_config_change_is_acked_after_the_front_end_rereads_the_config(
    tmp_path: Path,
) -> None:
    device = ConfigDevice()
    async with served(tmp_path, device) as (server, fe):
        await fe.negotiate()
        assert fe.protocol_features & ProtocolFeature.BACKEND_REQ
        seen: list[bytes] = []

        async def reread(msg: BackendMessage) -> None:
            # QEMU reads the config on the main socket before it acks.
            seen.append(await fe.get_config(0, 4))

        fe.on_backend_request = reread
        device.generation = 7
        assert await server.config_changed()
        [msg] = fe.backend_requests
        assert (msg.request, msg.need_reply) == (CONFIG_CHANGE, True)
        assert seen == [(7).to_bytes(4, "little")]
        await echo_works(fe)


async def test_without_reply_ack_no_ack_is_asked_for(tmp_path: Path) -> None:
    async with served(tmp_path) as (server, fe):
        await fe.send(Request.SET_OWNER)
        fe.protocol_features = int(ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ)
        await fe.send(Request.SET_PROTOCOL_FEATURES, fe.protocol_features)
        await fe.open_backend_channel()
        await fe.send(Request.GET_FEATURES)  # nothing acks: wait for a reply instead
        assert await server.config_changed()
        [msg] = await fe.wait_backend_requests(1)
        assert (msg.request, msg.need_reply) == (CONFIG_CHANGE, False)


async def test_front_end_that_fails_the_request_keeps_its_channel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with served(tmp_path) as (server, fe):
        await fe.negotiate()
        fe.backend_answer = 1
        assert not await server.config_changed()
        assert "front-end failed CONFIG_CHANGE_MSG" in caplog.text
        fe.backend_answer = 0
        assert await server.config_changed()
        assert len(fe.backend_requests) == 2
        await echo_works(fe)


@pytest.mark.parametrize(
    ("answer", "text"),
    [
        (b"\x02\0\0\0\x05\0\0\0\x04\0\0\0\0\0\0\0", "payload is 4 bytes, expected 8"),
        (b"\x09\0\0\0\x05\0\0\0\x08\0\0\0" + bytes(8), "reply to back-end request 9"),
        (b"\x02\0\0\0\x07\0\0\0" + bytes(4), "bad protocol version"),
    ],
    ids=["short", "wrong-request", "bad-version"],
)
async def test_garbled_reply_closes_only_the_channel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, answer: bytes, text: str
) -> None:
    async with served(tmp_path) as (server, fe):
        await fe.negotiate()
        fe.backend_answer = answer
        with caplog.at_level(logging.ERROR):
            assert not await server.config_changed()
        assert text in caplog.text and "channel closed" in caplog.text
        assert server.session is not None and server.session.backend_link is None
        await echo_works(fe)
        # A new channel replaces the broken one.
        fe.backend_answer = 0
        await fe.open_backend_channel()
        assert await server.config_changed()
        await echo_works(fe)


async def test_front_end_that_closes_the_channel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with served(tmp_path) as (server, fe):
        await fe.negotiate()
        fe.close_backend_channel()
        with caplog.at_level(logging.ERROR):
            assert not await server.config_changed()
        assert "back-end channel" in caplog.text and "channel closed" in caplog.text
        caplog.clear()
        assert not await server.config_changed()
        assert "set up no back-end channel" in caplog.text
        await echo_works(fe)


async def test_front_end_that_never_answers_times_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with served(tmp_path) as (server, fe):
        await fe.negotiate()
        fe.backend_answer = None
        assert not await server.config_changed(timeout=0.2)
        assert "no acknowledgement in 0.2s" in caplog.text
        await echo_works(fe)


async def test_replaced_channel_and_reconnect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(ConfigDevice(), tmp_path / "d.sock") as server:
        async with Frontend.connect(server.path) as fe:
            await fe.negotiate()
            first = fe.backend_sock
            await fe.open_backend_channel()
            assert "replaced the back-end channel" in caplog.text
            assert first is not None and first.fileno() == -1
            assert await server.config_changed()
        with trio.fail_after(10):
            while server.session is not None:
                await trio.sleep(0.01)
        assert not await server.config_changed()  # nobody connected
        async with Frontend.connect(server.path) as fe:
            await fe.negotiate()
            assert await server.config_changed()
            assert len(fe.backend_requests) == 1


@pytest.mark.parametrize("kind", ["eventfd", "datagram"])
async def test_backend_req_fd_that_is_not_a_stream_socket_fails_the_request(
    tmp_path: Path, kind: str
) -> None:
    async with served(tmp_path) as (server, fe):
        await fe.send(Request.SET_OWNER)
        features = ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ
        fe.protocol_features = int(features | ProtocolFeature.REPLY_ACK)
        await fe.send(Request.SET_PROTOCOL_FEATURES, fe.protocol_features)
        if kind == "eventfd":
            fd = os.eventfd(0)
        else:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            ours.close()
            fd = theirs.detach()
        try:
            reply = await fe.send(Request.SET_BACKEND_REQ_FD, None, [fd], need_reply=True)
        finally:
            os.close(fd)
        assert reply is not None and reply.payload != 0
        assert server.session is not None and server.session.backend_link is None
        await fe.set_mem_table()
        await echo_works(fe)


async def test_devices_without_a_config_space_offer_no_backend_channel(tmp_path: Path) -> None:
    class Plain(ConfigDevice):
        config = Device.config  # type: ignore[assignment]

    async with (
        running_server(Plain(), tmp_path / "d.sock") as server,
        Frontend.connect(server.path) as fe,
    ):
        await fe.negotiate()
        assert not fe.protocol_features & ProtocolFeature.BACKEND_REQ
        assert fe.backend_sock is None


async def test_resize_and_link_refused_by_devices_without_them(tmp_path: Path) -> None:
    server = DeviceServer(ConfigDevice(), tmp_path / "d.sock")
    with pytest.raises(ValueError, match="a ConfigDevice cannot be resized"):
        await server.resize(1 << 20)
    with pytest.raises(ValueError, match="a ConfigDevice has no link"):
        await server.set_link(False)
