"""Regression tests for the server side of the hardening issue (11)."""

from __future__ import annotations

from pathlib import Path

import pytest
from vdev_backends.blk_ram import RamBackend
from vdev_backends.net_echo import EchoBackend

from vdev.devices.base import Device
from vdev.devices.blk import BlkDevice
from vdev.devices.net import NetDevice
from vdev.protocol import ProtocolFeature, Request
from vdev.testing.frontend import Frontend, serve_device


@pytest.mark.parametrize(
    ("device", "config"),
    [(BlkDevice(RamBackend(1 << 20)), True), (NetDevice(EchoBackend()), False)],
    ids=["blk", "net"],
)
async def test_config_protocol_feature_per_device_type(
    tmp_path: Path, device: Device, config: bool
) -> None:
    async with serve_device(device, tmp_path / "dev.sock") as path, Frontend.connect(path) as fe:
        await fe.send(Request.SET_OWNER)
        msg = await fe.send(Request.GET_PROTOCOL_FEATURES)
    assert msg is not None and isinstance(msg.payload, int)
    assert bool(msg.payload & ProtocolFeature.CONFIG) == config
    assert msg.payload & ProtocolFeature.REPLY_ACK
