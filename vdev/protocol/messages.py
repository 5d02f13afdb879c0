"""Payloads of vhost-user messages: frozen dataclasses with a compiled wire layout.

All numbers are in native byte order, as the spec says. ``decode`` raises ValueError for
a payload of the wrong size or with reserved bits set; ``encode`` raises ValueError (or
struct.error) for a value that does not fit its field.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import astuple, dataclass
from enum import Enum
from typing import Any, ClassVar, Self

from .constants import MAX_MEM_REGIONS, VRING_IDX_MASK, VRING_NOFD_MASK

U64 = struct.Struct("=Q")
MAC_SIZE = 6


def _check_size(data: bytes, expected: int) -> None:
    if len(data) != expected:
        raise ValueError(f"payload is {len(data)} bytes, expected {expected}")


class _FixedPayload:
    """A payload that is exactly one struct, field for field."""

    STRUCT: ClassVar[struct.Struct]

    def encode(self) -> bytes:
        return self.STRUCT.pack(*astuple(self))  # type: ignore[call-overload]

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _check_size(data, cls.STRUCT.size)
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True)
class VringState(_FixedPayload):
    """Ring index and a number (size, base index or enable flag)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")
    index: int
    num: int


@dataclass(frozen=True)
class VringAddress(_FixedPayload):
    """SET_VRING_ADDR: the ring's addresses in the front-end's address space."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True)
class InflightDescription(_FixedPayload):
    """GET/SET_INFLIGHT_FD: where the in-flight buffer lies in its fd, and the queues
    it covers (QEMU's VhostUserInflight, padded to 24 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True)
class LogDescription(_FixedPayload):
    """SET_LOG_BASE (with LOG_SHMFD): where the dirty log lies in the fd that travels
    with it (VhostUserLog)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQ")
    mmap_size: int
    mmap_offset: int


@dataclass(frozen=True)
class MemoryRegion(_FixedPayload):
    """One region of guest memory, mapped from the fd that travels with it."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: ring index and whether an fd is attached (bit 8 clear)."""

    index: int
    fd_present: bool

    def encode(self) -> bytes:
        if not 0 <= self.index <= VRING_IDX_MASK:
            raise ValueError(f"ring index {self.index} does not fit in 8 bits")
        return U64.pack(self.index | (0 if self.fd_present else VRING_NOFD_MASK))

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _check_size(data, U64.size)
        (value,) = U64.unpack(data)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise ValueError(f"reserved bits set in 0x{value:x}")
        return cls(value & VRING_IDX_MASK, not value & VRING_NOFD_MASK)


@dataclass(frozen=True)
class MemoryTable:
    """SET_MEM_TABLE: u32 nregions, u32 padding, then the regions (at most 8).

    Encodes only the used regions, as QEMU does; decodes that form or the full
    8-slot array.
    """

    HEADER: ClassVar[struct.Struct] = struct.Struct("=II")
    regions: tuple[MemoryRegion, ...]

    def encode(self) -> bytes:
        if len(self.regions) > MAX_MEM_REGIONS:
            raise ValueError(f"{len(self.regions)} regions, at most {MAX_MEM_REGIONS}")
        return self.HEADER.pack(len(self.regions), 0) + b"".join(
            region.encode() for region in self.regions
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        if len(data) < cls.HEADER.size:
            raise ValueError(f"payload is {len(data)} bytes, shorter than its header")
        count, _padding = cls.HEADER.unpack_from(data)
        if count > MAX_MEM_REGIONS:
            raise ValueError(f"{count} regions, at most {MAX_MEM_REGIONS}")
        step = MemoryRegion.STRUCT.size
        if len(data) not in (
            cls.HEADER.size + count * step,
            cls.HEADER.size + MAX_MEM_REGIONS * step,
        ):
            raise ValueError(f"payload is {len(data)} bytes, wrong for {count} regions")
        start = cls.HEADER.size
        return cls(
            tuple(
                MemoryRegion.decode(data[offset : offset + step])
                for offset in range(start, start + count * step, step)
            )
        )


@dataclass(frozen=True)
class MemoryRegionUpdate:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region."""

    PADDING: ClassVar[bytes] = bytes(U64.size)
    region: MemoryRegion

    def encode(self) -> bytes:
        return self.PADDING + self.region.encode()

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _check_size(data, U64.size + MemoryRegion.STRUCT.size)
        return cls(MemoryRegion.decode(data[U64.size :]))


@dataclass(frozen=True)
class DeviceConfig:
    """GET_CONFIG / SET_CONFIG: u32 offset, u32 size, u32 flags, then ``size`` bytes."""

    HEADER: ClassVar[struct.Struct] = struct.Struct("=III")
    offset: int
    size: int
    flags: int
    data: bytes

    def encode(self) -> bytes:
        if len(self.data) != self.size:
            raise ValueError(f"{len(self.data)} data bytes for a size of {self.size}")
        return self.HEADER.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def decode(cls, data: bytes) -> Self:
        if len(data) < cls.HEADER.size:
            raise ValueError(f"payload is {len(data)} bytes, shorter than its header")
        offset, size, flags = cls.HEADER.unpack_from(data)
        if len(data) - cls.HEADER.size != size:
            raise ValueError(f"size field {size} but {len(data) - cls.HEADER.size} data bytes")
        return cls(offset, size, flags, bytes(data[cls.HEADER.size :]))


class PayloadKind(Enum):
    """The payload layouts a request or reply can have."""

    NONE = "none"
    U64 = "u64"
    MAC = "mac"
    VRING_STATE = "vring state"
    VRING_ADDRESS = "vring address"
    VRING_FILE = "vring file"
    MEMORY_TABLE = "memory table"
    MEMORY_REGION = "memory region"
    DEVICE_CONFIG = "device config"
    INFLIGHT = "inflight description"
    LOG = "log description"


def _decode_none(data: bytes) -> None:
    _check_size(data, 0)


def _decode_u64(data: bytes) -> int:
    _check_size(data, U64.size)
    return int(U64.unpack(data)[0])


def _decode_mac(data: bytes) -> bytes:
    _check_size(data, U64.size)
    return bytes(data[:MAC_SIZE])


def _encode_mac(mac: bytes) -> bytes:
    if len(mac) != MAC_SIZE:
        raise ValueError(f"a MAC address is {MAC_SIZE} bytes, not {len(mac)}")
    return bytes(mac) + bytes(U64.size - MAC_SIZE)


@dataclass(frozen=True)
class _Codec:
    type: type
    decode: Callable[[bytes], object]
    encode: Callable[[Any], bytes]


_CODECS: dict[PayloadKind, _Codec] = {
    PayloadKind.NONE: _Codec(type(None), _decode_none, lambda _value: b""),
    PayloadKind.U64: _Codec(int, _decode_u64, U64.pack),
    PayloadKind.MAC: _Codec(bytes, _decode_mac, _encode_mac),
    PayloadKind.VRING_STATE: _Codec(VringState, VringState.decode, VringState.encode),
    PayloadKind.VRING_ADDRESS: _Codec(VringAddress, VringAddress.decode, VringAddress.encode),
    PayloadKind.VRING_FILE: _Codec(VringFile, VringFile.decode, VringFile.encode),
    PayloadKind.MEMORY_TABLE: _Codec(MemoryTable, MemoryTable.decode, MemoryTable.encode),
    PayloadKind.MEMORY_REGION: _Codec(
        MemoryRegionUpdate, MemoryRegionUpdate.decode, MemoryRegionUpdate.encode
    ),
    PayloadKind.DEVICE_CONFIG: _Codec(DeviceConfig, DeviceConfig.decode, DeviceConfig.encode),
    PayloadKind.INFLIGHT: _Codec(
        InflightDescription, InflightDescription.decode, InflightDescription.encode
    ),
    PayloadKind.LOG: _Codec(LogDescription, LogDescription.decode, LogDescription.encode),
}


def decode_payload(kind: PayloadKind, data: bytes) -> object:
    """Decode ``data`` as a payload of ``kind`` (ValueError if it does not fit)."""
    return _CODECS[kind].decode(data)


def encode_payload(kind: PayloadKind, value: object) -> bytes:
    """Encode ``value`` as a payload of ``kind`` (TypeError/ValueError if it can't be)."""
    codec = _CODECS[kind]
    if not isinstance(value, codec.type):
        raise TypeError(f"a {kind.value} payload must be {codec.type.__name__}, not {value!r}")
    try:
        return codec.encode(value)
    except struct.error as exc:
        raise ValueError(f"{value!r} does not fit a {kind.value} payload: {exc}") from exc
