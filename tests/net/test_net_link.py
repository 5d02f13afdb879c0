"""NIC link state (VIRTIO_NET_F_STATUS) set by the back-end.

QEMU 7.2 cannot be told: its virtio-net never acks the CONFIG protocol feature for a
vhost-user netdev (no config notifier: vhost_user_backend_init drops CONFIG) and
answers CONFIG_CHANGE_MSG with -ENOSYS; it takes the link state from its own netdev
(QMP set_link). So the link is tested with vdev.testing's front-end, which reads the
config over vhost-user when the NIC's `config_space` option offers it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vdev_backends.net_echo import EchoBackend

from vdev.devices.net import NET_CONFIG, NetDevice, NetFeature, NetStatus
from vdev.protocol import BackendRequest, ProtocolFeature
from vdev.testing.frontend import Frontend, running_server


async def status(fe: Frontend) -> int:
    _mac, status, _pairs, _mtu = NET_CONFIG.unpack(await fe.get_config(0, NET_CONFIG.size))
    return int(status)


async def test_link_down_and_up_reach_the_front_end(tmp_path: Path) -> None:
    nic = NetDevice(EchoBackend(), mac="52:54:00:12:34:56", config_space=True)
    async with (
        running_server(nic, tmp_path / "nic.sock") as server,
        Frontend.connect(server.path) as fe,
    ):
        features = await fe.negotiate()
        assert features & NetFeature.STATUS
        assert fe.protocol_features & ProtocolFeature.CONFIG
        assert await status(fe) == NetStatus.LINK_UP

        assert await server.set_link(False)
        [msg] = fe.backend_requests
        assert msg.request is BackendRequest.CONFIG_CHANGE_MSG and msg.need_reply
        assert await status(fe) == 0

        assert await server.set_link(True)
        assert len(fe.backend_requests) == 2
        assert await status(fe) == NetStatus.LINK_UP
        # The rest of the config stays as it was.
        mac, _status, pairs, _mtu = NET_CONFIG.unpack(await fe.get_config(0, NET_CONFIG.size))
        assert (mac, pairs) == (bytes.fromhex("525400123456"), 1)
    nic.close()


async def test_default_nic_refuses_a_link_change_it_cannot_signal(tmp_path: Path) -> None:
    nic = NetDevice(EchoBackend())
    async with (
        running_server(nic, tmp_path / "nic.sock") as server,
        Frontend.connect(server.path) as fe,
    ):
        await fe.negotiate()
        offered = ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ
        assert not fe.protocol_features & offered
        with pytest.raises(ValueError, match="QEMU: QMP set_link") as info:
            await server.set_link(False)
        assert "\n" not in str(info.value)
        assert nic.link_up
        with pytest.raises(ValueError, match="a NetDevice cannot be resized"):
            await server.resize(1 << 20)
    nic.close()


def test_config_space_option_is_checked() -> None:
    with pytest.raises(ValueError, match="config_space: "):
        NetDevice(EchoBackend(), config_space="perhaps")
