"""The vhost-user protocol, sans-I/O: bytes and fds in, events out; results in, bytes out."""

from .backend_channel import BackendChannel, BackendMessage, BackendReply, FrontendChannel
from .connection import FAILURE_ACK, BackendConnection, FrontendConnection, Message
from .constants import (
    F_PROTOCOL_FEATURES,
    MAX_FDS,
    VIRTIO_F_RING_PACKED,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    ConfigType,
    HeaderFlag,
    ProtocolFeature,
    Request,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .messages import (
    DeviceConfig,
    InflightDescription,
    LogDescription,
    MemoryRegion,
    MemoryRegionUpdate,
    MemoryTable,
    VringAddress,
    VringFile,
    VringState,
)
from .rules import SUPPORTED_PROTOCOL_FEATURES

__all__ = [
    "FAILURE_ACK",
    "F_PROTOCOL_FEATURES",
    "MAX_FDS",
    "SUPPORTED_PROTOCOL_FEATURES",
    "VIRTIO_F_RING_PACKED",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "BackendChannel",
    "BackendConnection",
    "BackendMessage",
    "BackendReply",
    "BackendRequest",
    "ConfigType",
    "DeviceConfig",
    "FrontendChannel",
    "FrontendConnection",
    "HeaderFlag",
    "InflightDescription",
    "LocalProtocolError",
    "LogDescription",
    "MemoryRegion",
    "MemoryRegionUpdate",
    "MemoryTable",
    "Message",
    "ProtocolError",
    "ProtocolFeature",
    "RemoteProtocolError",
    "Request",
    "VringAddress",
    "VringFile",
    "VringState",
]
