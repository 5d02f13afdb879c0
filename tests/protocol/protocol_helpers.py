"""Helpers for the sans-I/O protocol tests: fake fds and a negotiated session."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from vdev.protocol import (
    F_PROTOCOL_FEATURES,
    SUPPORTED_PROTOCOL_FEATURES,
    BackendConnection,
    DeviceConfig,
    FrontendConnection,
    InflightDescription,
    LogDescription,
    MemoryRegion,
    MemoryRegionUpdate,
    MemoryTable,
    Message,
    Request,
    VringAddress,
    VringFile,
    VringState,
)
from vdev.protocol.messages import PayloadKind

VIRTIO_F_VERSION_1 = 1 << 32
FEATURES = F_PROTOCOL_FEATURES | VIRTIO_F_VERSION_1 | (1 << 34) | 0x3F
NUM_QUEUES = 2

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
regions = st.builds(MemoryRegion, u64, u64, u64, u64)
PAYLOADS: dict[PayloadKind, st.SearchStrategy[object]] = {
    PayloadKind.NONE: st.none(),
    PayloadKind.U64: u64,
    PayloadKind.MAC: st.binary(min_size=6, max_size=6),
    PayloadKind.VRING_STATE: st.builds(VringState, u32, u32),
    PayloadKind.VRING_ADDRESS: st.builds(VringAddress, u32, u32, u64, u64, u64, u64),
    PayloadKind.VRING_FILE: st.builds(VringFile, st.integers(0, 255), st.booleans()),
    PayloadKind.MEMORY_TABLE: st.builds(MemoryTable, st.lists(regions, max_size=8).map(tuple)),
    PayloadKind.MEMORY_REGION: st.builds(MemoryRegionUpdate, regions),
    PayloadKind.DEVICE_CONFIG: st.binary(max_size=256).flatmap(
        lambda data: st.builds(DeviceConfig, u32, st.just(len(data)), u32, st.just(data))
    ),
    PayloadKind.INFLIGHT: st.builds(InflightDescription, u64, u64, u16, u16),
    PayloadKind.LOG: st.builds(LogDescription, u64, u64),
}


class FdLedger:
    """Hands out fake fds (>= 10**6) and checks every close: known, open, once."""

    def __init__(self) -> None:
        self._next = 10**6
        self.open: set[int] = set()
        self.closed: list[int] = []

    def new(self, count: int = 1) -> list[int]:
        fds = list(range(self._next, self._next + count))
        self._next += count
        self.open.update(fds)
        return fds

    def close(self, fd: int) -> None:
        assert fd in self.open, f"closing fd {fd}, which is unknown or already closed"
        self.open.remove(fd)
        self.closed.append(fd)


class Session:
    """A BackendConnection and a FrontendConnection wired back to back (no sockets)."""

    def __init__(self, ledger: FdLedger, **backend_options: int) -> None:
        options = {
            "features": FEATURES,
            "protocol_features": int(SUPPORTED_PROTOCOL_FEATURES),
            "num_queues": NUM_QUEUES,
        }
        options.update(backend_options)
        self.ledger = ledger
        self.backend = BackendConnection(close_fd=ledger.close, **options)
        self.frontend = FrontendConnection(close_fd=ledger.close)

    def send(
        self,
        request: Request,
        payload: object = None,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> Message | None:
        """Encode on the front-end, feed the back-end, return its next event."""
        data = self.frontend.send(request, payload, fds, need_reply)
        self.backend.receive_data(data, fds)
        return self.backend.next_event()

    def replies(self) -> list[Message]:
        """Every reply the back-end queued, decoded by the front-end."""
        self.frontend.receive_data(self.backend.data_to_send())
        replies = []
        while (reply := self.frontend.next_reply()) is not None:
            replies.append(reply)
        assert self.frontend.pending_replies == 0
        return replies

    def negotiate(self, protocol_features: int | None = None) -> None:
        """GET/SET the (protocol) features and SET_OWNER, as QEMU does at start-up."""
        if protocol_features is None:
            protocol_features = self.backend.protocol_features
        for request, payload in (
            (Request.GET_FEATURES, None),
            (Request.GET_PROTOCOL_FEATURES, None),
            (Request.SET_PROTOCOL_FEATURES, protocol_features),
            (Request.SET_OWNER, None),
        ):
            assert self.send(request, payload) is None
        replies = self.replies()
        assert [(r.request, r.payload) for r in replies] == [
            (Request.GET_FEATURES, self.backend.features),
            (Request.GET_PROTOCOL_FEATURES, self.backend.protocol_features),
        ]
