"""Socket-level tests: a real vdev server, driven by vdev.testing's front-end."""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest
import trio

from vdev.devices.base import Device, Queue
from vdev.protocol import ProtocolFeature, Request, VringState
from vdev.testing.frontend import Frontend, FrontendError, serve_device
from vdev.virtio.features import VirtioFeature


class EchoDevice(Device):
    """A raw device: copies each chain's readable bytes into its writable buffers."""

    device_id = 0x7F
    protocol_features = 0

    def __init__(self, num_queues: int = 2) -> None:
        super().__init__(num_queues=num_queues)
        self.handled = [0] * num_queues

    def config(self) -> bytes:
        return b"echo-config".ljust(16, b"\0")

    def handle(self, queue: Queue) -> None:
        while (chain := queue.pop()) is not None:
            data = b"".join(bytes(v) for v in chain.readable)
            queue.push(chain, chain.write_into(data))
            self.handled[queue.index] += 1
        queue.notify()


@pytest.fixture
def sock_path(tmp_path):
    return tmp_path / "dev.sock"


@pytest.mark.parametrize("packed", [False, True])
async def test_handshake_and_echo(sock_path, packed):
    device = EchoDevice()
    async with serve_device(device, sock_path), Frontend.connect(sock_path) as fe:
        features = await fe.negotiate(packed=packed)
        assert features & VirtioFeature.VERSION_1
        assert bool(features & VirtioFeature.RING_PACKED) == packed
        assert fe.protocol_features & ProtocolFeature.REPLY_ACK
        q0 = await fe.setup_queue(0)
        q1 = await fe.setup_queue(1)
        for i in range(200):
            payload = os.urandom(1 + i * 7 % 3000)
            used = await (q0 if i % 2 else q1).transact([payload], [len(payload)])
            assert used.written == len(payload)
            assert b"".join(used.data) == payload
        assert device.handled == [100, 100]
        assert (await fe.get_config(0, 16)).startswith(b"echo-config")
        # A batch: many chains, one kick.
        for i in range(20):
            q0.add([bytes([i]) * 10], [4, 6])
        q0.kick()
        used = await q0.wait_used(20)
        assert sorted(b"".join(u.data) for u in used) == sorted(bytes([i]) * 10 for i in range(20))


async def test_get_vring_base_stops_queue(sock_path):
    async with serve_device(EchoDevice(), sock_path), Frontend.connect(sock_path) as fe:
        await fe.negotiate()
        q = await fe.setup_queue(0)
        for _ in range(5):
            await q.transact([b"x"], [1])
        assert await fe.stop_queue(0) == 5


async def test_queue_num_and_bad_index(sock_path):
    async with serve_device(EchoDevice(num_queues=2), sock_path), Frontend.connect(sock_path) as fe:
        await fe.negotiate()
        msg = await fe.send(Request.GET_QUEUE_NUM)
        assert msg.payload == 2
        # Ring index beyond the queue count: a failure ack (REPLY_ACK), session goes on.
        ack = await fe.send(Request.SET_VRING_NUM, VringState(5, 64), need_reply=True)
        assert ack.payload != 0
        q = await fe.setup_queue(0)
        assert (await q.transact([b"still here"], [16])).data[0] == b"still here"


async def test_second_connection_refused_and_reconnect(sock_path):
    device = EchoDevice()
    async with serve_device(device, sock_path):
        async with Frontend.connect(sock_path) as fe:
            await fe.negotiate()
            q = await fe.setup_queue(0)
            await q.transact([b"one"], [3])
            # A second front-end is refused: its connection is closed at once.
            with trio.socket.socket(socket.AF_UNIX) as other:
                await other.connect(str(sock_path))
                with trio.fail_after(5):
                    assert await other.recv(1) == b""
            await q.transact([b"two"], [3])
        # The first front-end went away: the device is reset and a new one is served.
        async with Frontend.connect(sock_path) as fe:
            await fe.negotiate()
            q = await fe.setup_queue(0)
            assert (await q.transact([b"three"], [5])).data[0] == b"three"


async def test_malformed_messages_then_good_session(sock_path):
    """10,000 malformed messages in a row; the daemon then serves a good session."""
    rng = random.Random(1234)
    async with serve_device(EchoDevice(), sock_path):
        s = trio.socket.socket(socket.AF_UNIX)
        await s.connect(str(sock_path))
        sent = 0
        while sent < 10_000:
            kind = rng.randrange(4)
            if kind == 0:  # unknown request
                msg = struct.pack("<III", rng.randrange(44, 1 << 32), 1, 0)
            elif kind == 1:  # wrong size for a known request
                msg = struct.pack("<III", Request.SET_FEATURES, 1, 3) + b"abc"
            elif kind == 2:  # bad version bits
                msg = struct.pack("<III", Request.GET_FEATURES, 2, 0)
            else:  # random junk
                msg = rng.randbytes(rng.randrange(1, 64))
            try:
                await s.send(msg)
            except OSError:  # the daemon hung up on us: reconnect and go on
                s.close()
                s = trio.socket.socket(socket.AF_UNIX)
                await s.connect(str(sock_path))
                continue
            sent += 1
        s.close()
        async with Frontend.connect(sock_path) as fe:
            await fe.negotiate()
            q = await fe.setup_queue(1)
            assert (await q.transact([b"alive"], [5])).data[0] == b"alive"


async def test_hostile_chain_breaks_only_its_queue(sock_path):
    async with serve_device(EchoDevice(), sock_path), Frontend.connect(sock_path) as fe:
        await fe.negotiate()
        q0 = await fe.setup_queue(0)
        q1 = await fe.setup_queue(1)
        # Point the first chain's head descriptor (index 0) outside guest memory.
        q0.add([b"bad"], [3])
        q0.ring._desc[0:8] = struct.pack("<Q", 0xDEAD_0000_0000)
        q0.kick()
        with pytest.raises(FrontendError):
            await q0.wait_used(1, timeout=1)
        assert (await q1.transact([b"ok"], [2])).data[0] == b"ok"


async def test_stale_socket_replaced_live_one_refused(sock_path):
    from vdev.server import DeviceServer, ServerError

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()  # the file stays, nobody listens: stale
    async with serve_device(EchoDevice(), sock_path):
        assert oct(sock_path.stat().st_mode & 0o777) == "0o600"
        with pytest.raises(ServerError, match="in use"):
            await DeviceServer(EchoDevice(), sock_path).serve()
    assert not sock_path.exists()


async def test_the_socket_appears_only_once_it_listens(sock_path):
    from vdev.server import listen_unix

    with await listen_unix(sock_path, 0o640):
        assert sock_path.is_socket() and oct(sock_path.stat().st_mode & 0o777) == "0o640"
        assert sorted(sock_path.parent.iterdir()) == [sock_path]  # no staging left
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(sock_path))  # no window in which the file refuses


async def test_a_failed_listen_leaves_no_file(tmp_path):
    from vdev.server import ServerError, listen_unix

    path = tmp_path / "missing-dir" / "dev.sock"
    with pytest.raises(ServerError, match="cannot listen on"):
        await listen_unix(path)
    assert not path.parent.exists()


@pytest.mark.parametrize("packed", [False, True])
async def test_status_0_before_get_vring_base_keeps_the_base(sock_path, packed):
    """QEMU 7.2 stops a device (vhost_dev_stop) with SET_STATUS 0, then SET_VRING_ENABLE
    0, then GET_VRING_BASE, and migrates that base: the reset must not lose it."""
    device = EchoDevice(1)
    async with serve_device(device, sock_path), Frontend.connect(sock_path) as fe:
        await fe.negotiate(packed=packed)
        assert fe.protocol_features & ProtocolFeature.STATUS
        queue = await fe.setup_queue(0)
        for i in range(5):
            await queue.transact([b"request %d" % i], [16])
        assert (await fe.send(Request.SET_STATUS, 0, need_reply=True)).payload == 0
        assert device.acked_features == 0  # the device was reset
        await fe.send(Request.SET_VRING_ENABLE, VringState(0, 0), need_reply=True)
        base = await fe.stop_queue(0)
        # A ring left alone by status 0 stays stopped until it is set up again.
        queue.add([b"late"], [4])
        queue.kick()
        with pytest.raises(FrontendError):
            await queue.wait_used(1, timeout=0.3)
    # packed: 5 chains of 2 descriptors, next avail and used position 10, wraps 1
    assert base == (0x800A_800A if packed else 5)
