"""Payload dataclasses: wire layout, round trips and malformed input."""

from __future__ import annotations

import struct
from dataclasses import astuple

import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_helpers import PAYLOADS

from vdev.protocol import (
    DeviceConfig,
    MemoryRegion,
    MemoryRegionUpdate,
    MemoryTable,
    VringAddress,
    VringFile,
    VringState,
)
from vdev.protocol.messages import PayloadKind, decode_payload, encode_payload


@given(st.sampled_from(list(PayloadKind)).flatmap(lambda k: st.tuples(st.just(k), PAYLOADS[k])))
def test_payload_round_trip(kind_and_value: tuple[PayloadKind, object]) -> None:
    kind, value = kind_and_value
    assert decode_payload(kind, encode_payload(kind, value)) == value


def test_wire_layouts_are_native_and_packed() -> None:
    assert VringState(1, 256).encode() == struct.pack("=II", 1, 256)
    address = VringAddress(3, 1, 0x1000, 0x2000, 0x3000, 0x4000)
    assert address.encode() == struct.pack("=IIQQQQ", 3, 1, 0x1000, 0x2000, 0x3000, 0x4000)
    assert VringFile(5, True).encode() == struct.pack("=Q", 5)
    assert VringFile(5, False).encode() == struct.pack("=Q", 5 | 0x100)
    region = MemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0)
    table = MemoryTable((region, region))
    assert table.encode() == struct.pack("=II", 2, 0) + struct.pack("=QQQQ", *astuple(region)) * 2
    assert MemoryRegionUpdate(region).encode() == bytes(8) + region.encode()
    assert DeviceConfig(4, 2, 1, b"ab").encode() == struct.pack("=III", 4, 2, 1) + b"ab"
    assert encode_payload(PayloadKind.MAC, b"\x52\x54\x00\x12\x34\x56") == b"RT\x00\x124V\x00\x00"


def test_memory_table_accepts_the_full_eight_slot_array() -> None:
    region = MemoryRegion(0x1000, 0x2000, 0x3000, 0)
    full = struct.pack("=II", 1, 0) + region.encode() + bytes(7 * 32)
    assert MemoryTable.decode(full) == MemoryTable((region,))


@pytest.mark.parametrize(
    ("kind", "data", "message"),
    [
        (PayloadKind.NONE, b"\0", "payload is 1 bytes, expected 0"),
        (PayloadKind.U64, b"\0" * 4, "payload is 4 bytes, expected 8"),
        (PayloadKind.MAC, b"\0" * 6, "payload is 6 bytes, expected 8"),
        (PayloadKind.VRING_STATE, b"\0" * 12, "expected 8"),
        (PayloadKind.VRING_ADDRESS, b"\0" * 32, "expected 40"),
        (PayloadKind.VRING_FILE, struct.pack("=Q", 1 << 9), "reserved bits"),
        (PayloadKind.MEMORY_TABLE, b"\0" * 4, "shorter than its header"),
        (PayloadKind.MEMORY_TABLE, struct.pack("=II", 9, 0) + bytes(9 * 32), "9 regions"),
        (PayloadKind.MEMORY_TABLE, struct.pack("=II", 2, 0) + bytes(32), "wrong for 2 regions"),
        (PayloadKind.MEMORY_REGION, bytes(32), "expected 40"),
        (PayloadKind.DEVICE_CONFIG, bytes(8), "shorter than its header"),
        (PayloadKind.DEVICE_CONFIG, struct.pack("=III", 0, 4, 0) + b"ab", "size field 4"),
    ],
)
def test_decode_rejects_malformed_payloads(kind: PayloadKind, data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_payload(kind, data)


@pytest.mark.parametrize(
    ("kind", "value", "error"),
    [
        (PayloadKind.U64, -1, ValueError),
        (PayloadKind.U64, 2**64, ValueError),
        (PayloadKind.U64, "1", TypeError),
        (PayloadKind.MAC, b"\0" * 5, ValueError),
        (PayloadKind.VRING_STATE, VringState(2**32, 0), ValueError),
        (PayloadKind.VRING_FILE, VringFile(256, True), ValueError),
        (PayloadKind.DEVICE_CONFIG, DeviceConfig(0, 3, 0, b"ab"), ValueError),
        (PayloadKind.MEMORY_TABLE, MemoryTable((MemoryRegion(0, 1, 0, 0),) * 9), ValueError),
        (PayloadKind.VRING_STATE, VringAddress(0, 0, 0, 0, 0, 0), TypeError),
    ],
)
def test_encode_rejects_values_that_do_not_fit(
    kind: PayloadKind, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        encode_payload(kind, value)


@given(st.binary(max_size=300), st.sampled_from(list(PayloadKind)))
def test_decode_of_random_bytes_raises_only_value_error(data: bytes, kind: PayloadKind) -> None:
    try:
        value = decode_payload(kind, data)
    except ValueError:
        return
    assert encode_payload(kind, value) == data or kind in (
        PayloadKind.MAC,
        PayloadKind.MEMORY_TABLE,
    )
