"""Wire constants of the vhost-user protocol (QEMU docs/interop/vhost-user.rst)."""

from __future__ import annotations

from enum import IntEnum, IntFlag


class Request(IntEnum):
    """Front-end -> back-end request types (``VHOST_USER_*`` minus the prefix)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(IntEnum):
    """Back-end -> front-end request types (``VHOST_USER_BACKEND_*`` minus the prefix)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(IntFlag):
    """Protocol feature bits (``VHOST_USER_PROTOCOL_F_*``), as masks: MQ is bit 0."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


class HeaderFlag(IntFlag):
    """Bits of the header's flags field."""

    VERSION = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


class ConfigType(IntEnum):
    """``flags`` of a GET_CONFIG / SET_CONFIG payload."""

    FRONTEND = 0
    MIGRATION = 1


VERSION_MASK = 0x3
"""Header flag bits holding the protocol version (which must be 1)."""

F_PROTOCOL_FEATURES = 1 << 30
"""VHOST_USER_F_PROTOCOL_FEATURES: the virtio feature bit announcing protocol features."""
VHOST_F_LOG_ALL = 1 << 26
"""Virtio feature bit for dirty logging during migration (needs SET_LOG_BASE)."""
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
"""Virtio feature bit for an IOMMU in front of the device (needs IOTLB_MSG)."""
VIRTIO_F_RING_PACKED = 1 << 34
"""Virtio feature bit for packed virtqueues (ring sizes need not be powers of two)."""

VHOST_VRING_F_LOG = 0x1
"""SET_VRING_ADDR flag: log writes to the used ring."""

MAX_FDS = 8
"""Most file descriptors one message may carry."""
MAX_MEM_REGIONS = 8
"""Most regions in a SET_MEM_TABLE payload."""
MAX_CONFIG_SIZE = 256
"""Largest device config space reachable through GET_CONFIG / SET_CONFIG."""
MAX_VIRTQUEUE_SIZE = 32768
"""Largest virtqueue size the virtio spec allows."""
MAX_QUEUES = 256
"""Most virtqueues addressable by the 8-bit index of SET_VRING_KICK/CALL/ERR."""

VRING_IDX_MASK = 0xFF
"""Bits of a SET_VRING_KICK/CALL/ERR payload holding the ring index."""
VRING_NOFD_MASK = 1 << 8
"""Bit of a SET_VRING_KICK/CALL/ERR payload meaning 'no fd attached'."""
