"""One table of what each supported request carries, needs and gets back."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import cast

from .constants import F_PROTOCOL_FEATURES, VHOST_F_LOG_ALL, ProtocolFeature, Request
from .messages import MemoryTable, PayloadKind, VringFile


class FdRule(Enum):
    """How many fds a request must carry."""

    NONE = "no fd"
    ONE = "exactly one fd"
    PER_REGION = "one fd per region"
    VRING_FILE = "one fd unless bit 8 is set"
    DISCARDED = "at most one fd, closed unused"


@dataclass(frozen=True)
class Rule:
    """How a request is checked and answered.

    ``virtio_feature``/``protocol_feature`` must have been offered (or, with
    ``acked``, negotiated) for the request to be legal; ``session`` requests need a
    prior SET_OWNER; ``internal`` ones are answered by the connection itself;
    ``reply_fd`` replies carry one fd.
    """

    payload: PayloadKind = PayloadKind.NONE
    reply: PayloadKind | None = None
    fds: FdRule = FdRule.NONE
    virtio_feature: int = 0
    protocol_feature: ProtocolFeature | None = None
    acked: bool = False
    session: bool = True
    internal: bool = False
    reply_fd: bool = False


_NEGOTIATION = {"session": False, "internal": True}
_PROTOCOL = {"virtio_feature": F_PROTOCOL_FEATURES}

RULES: dict[Request, Rule] = {
    Request.GET_FEATURES: Rule(reply=PayloadKind.U64, **_NEGOTIATION),
    Request.GET_PROTOCOL_FEATURES: Rule(reply=PayloadKind.U64, **_PROTOCOL, **_NEGOTIATION),
    Request.SET_PROTOCOL_FEATURES: Rule(PayloadKind.U64, **_PROTOCOL, **_NEGOTIATION),
    Request.GET_QUEUE_NUM: Rule(
        reply=PayloadKind.U64, protocol_feature=ProtocolFeature.MQ, **_NEGOTIATION
    ),
    Request.GET_MAX_MEM_SLOTS: Rule(
        reply=PayloadKind.U64,
        protocol_feature=ProtocolFeature.CONFIGURE_MEM_SLOTS,
        acked=True,
        **_NEGOTIATION,
    ),
    Request.SET_OWNER: Rule(**_NEGOTIATION),
    Request.SET_FEATURES: Rule(PayloadKind.U64),
    Request.RESET_OWNER: Rule(),
    Request.SET_MEM_TABLE: Rule(PayloadKind.MEMORY_TABLE, fds=FdRule.PER_REGION),
    # The back-end answers (u64 0) once it logs into the new log (spec: Migration).
    Request.SET_LOG_BASE: Rule(
        PayloadKind.LOG,
        reply=PayloadKind.U64,
        fds=FdRule.ONE,
        protocol_feature=ProtocolFeature.LOG_SHMFD,
        acked=True,
    ),
    Request.SET_LOG_FD: Rule(fds=FdRule.ONE, virtio_feature=VHOST_F_LOG_ALL),
    Request.SET_VRING_NUM: Rule(PayloadKind.VRING_STATE),
    Request.SET_VRING_ADDR: Rule(PayloadKind.VRING_ADDRESS),
    Request.SET_VRING_BASE: Rule(PayloadKind.VRING_STATE),
    Request.GET_VRING_BASE: Rule(PayloadKind.VRING_STATE, reply=PayloadKind.VRING_STATE),
    Request.SET_VRING_KICK: Rule(PayloadKind.VRING_FILE, fds=FdRule.VRING_FILE),
    Request.SET_VRING_CALL: Rule(PayloadKind.VRING_FILE, fds=FdRule.VRING_FILE),
    Request.SET_VRING_ERR: Rule(PayloadKind.VRING_FILE, fds=FdRule.VRING_FILE),
    Request.SET_VRING_ENABLE: Rule(PayloadKind.VRING_STATE, **_PROTOCOL),
    Request.SEND_RARP: Rule(PayloadKind.MAC, protocol_feature=ProtocolFeature.RARP),
    Request.NET_SET_MTU: Rule(PayloadKind.U64, protocol_feature=ProtocolFeature.NET_MTU),
    Request.GET_CONFIG: Rule(
        PayloadKind.DEVICE_CONFIG,
        reply=PayloadKind.DEVICE_CONFIG,
        protocol_feature=ProtocolFeature.CONFIG,
        acked=True,
    ),
    Request.SET_CONFIG: Rule(
        PayloadKind.DEVICE_CONFIG, protocol_feature=ProtocolFeature.CONFIG, acked=True
    ),
    Request.RESET_DEVICE: Rule(protocol_feature=ProtocolFeature.RESET_DEVICE),
    Request.ADD_MEM_REG: Rule(
        PayloadKind.MEMORY_REGION,
        fds=FdRule.ONE,
        protocol_feature=ProtocolFeature.CONFIGURE_MEM_SLOTS,
        acked=True,
    ),
    Request.REM_MEM_REG: Rule(
        PayloadKind.MEMORY_REGION,
        fds=FdRule.DISCARDED,
        protocol_feature=ProtocolFeature.CONFIGURE_MEM_SLOTS,
        acked=True,
    ),
    Request.GET_INFLIGHT_FD: Rule(
        PayloadKind.INFLIGHT,
        reply=PayloadKind.INFLIGHT,
        reply_fd=True,
        protocol_feature=ProtocolFeature.INFLIGHT_SHMFD,
        acked=True,
    ),
    Request.SET_INFLIGHT_FD: Rule(
        PayloadKind.INFLIGHT,
        fds=FdRule.ONE,
        protocol_feature=ProtocolFeature.INFLIGHT_SHMFD,
        acked=True,
    ),
    # QEMU sends it during negotiation, before SET_OWNER.
    Request.SET_BACKEND_REQ_FD: Rule(
        fds=FdRule.ONE, protocol_feature=ProtocolFeature.BACKEND_REQ, acked=True, session=False
    ),
    Request.SET_STATUS: Rule(PayloadKind.U64, protocol_feature=ProtocolFeature.STATUS, acked=True),
    Request.GET_STATUS: Rule(
        reply=PayloadKind.U64, protocol_feature=ProtocolFeature.STATUS, acked=True
    ),
}

SUPPORTED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.RARP
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.NET_MTU
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
    | ProtocolFeature.INFLIGHT_SHMFD
)
"""Protocol features whose requests this package implements (a device may offer these)."""

UNSUPPORTED_WITH_REPLY = frozenset(
    {
        Request.IOTLB_MSG,
        Request.CREATE_CRYPTO_SESSION,
        Request.POSTCOPY_ADVISE,
        Request.POSTCOPY_END,
        Request.GET_SHARED_OBJECT,
        Request.SET_DEVICE_STATE_FD,
        Request.CHECK_DEVICE_STATE,
    }
)
"""Unsupported requests whose reply has a body of its own (so no plain failure ack)."""


def has_own_reply(request: Request | None) -> bool:
    """Whether ``request`` is answered with a body of its own rather than an ack."""
    if request is None:
        return False
    rule = RULES.get(request)
    return request in UNSUPPORTED_WITH_REPLY if rule is None else rule.reply is not None


def fd_count_range(rule: Rule, payload: object) -> tuple[int, int]:
    """The least and most fds a request with this rule and decoded payload may carry."""
    match rule.fds:
        case FdRule.NONE:
            return 0, 0
        case FdRule.ONE:
            return 1, 1
        case FdRule.PER_REGION:
            count = len(cast(MemoryTable, payload).regions)
            return count, count
        case FdRule.VRING_FILE:
            count = 1 if cast(VringFile, payload).fd_present else 0
            return count, count
        case FdRule.DISCARDED:
            return 0, 1
