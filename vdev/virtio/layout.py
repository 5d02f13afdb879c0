"""Wire layout of split and packed virtqueues, shared by the device and driver sides.

All structures are little-endian (virtio 1.x). They are read with *native* struct
formats: those load each field at once, while the standard ``<`` formats go byte by
byte and could tear a 16-bit index the other side is updating concurrently. Hence the
little-endian host requirement below. Beware that ``Struct.pack_into`` zero-fills its
target before storing: a field the other side polls (split ``used.idx``, packed
descriptor flags) must be stored through a ``memoryview.cast("H")`` item instead, a
single 16-bit store.

Memory ordering: both sides write in the order the spec prescribes (buffer contents,
then ring entry, then index or flags) and rely on the host's total store order (x86-64)
to keep stores and loads in program order; the one reordering TSO allows, a load
passing an earlier store, is closed with `Fence` where notification suppression needs
it. A weakly ordered host (arm64) would need real barriers.
"""

from __future__ import annotations

import struct
import sys
import threading
from enum import IntEnum, IntFlag

from vdev.virtio.errors import VirtioError

if sys.byteorder != "little":  # pragma: no cover - vdev only targets little-endian hosts
    raise ImportError("vdev.virtio requires a little-endian host")

#: Largest queue size either ring layout allows.
MAX_QUEUE_SIZE = 32768

#: Descriptor, both layouts: split (addr, len, flags, next), packed (addr, len, id, flags).
DESC = struct.Struct("QIHH")
DESC_SIZE = DESC.size
#: A 16-bit ring field (avail/used idx and flags, ring entries, event fields).
U16 = struct.Struct("H")
#: Split used ring element (id, len).
USED_ELEM = struct.Struct("II")
#: Packed event suppression structure (desc_event_off_wrap, desc_event_flags).
EVENT_SUPPRESS = struct.Struct("HH")
#: Offsets of the two fields of a packed event suppression structure.
EVENT_OFF_WRAP_OFFSET = 0
EVENT_FLAGS_OFFSET = 2
#: The (len, id) fields of a packed used descriptor, at PACKED_LEN_OFFSET.
PACKED_LEN_ID = struct.Struct("IH")
PACKED_LEN_OFFSET = 8
#: A packed descriptor without its flags (addr, len, id), as the driver fills it first.
PACKED_DESC_BODY = struct.Struct("QIH")
#: Offset of a packed descriptor's flags (written last by the publishing side).
PACKED_FLAGS_OFFSET = 14
#: Offset of the ring entries in the split avail (u16 each) and used (8 bytes) rings.
SPLIT_RING_OFFSET = 4


class DescFlag(IntFlag):
    """Descriptor flags (AVAIL and USED exist only in packed rings)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4
    AVAIL = 1 << 7
    USED = 1 << 15


#: The flags as plain ints, for per-descriptor tests: ``int & IntFlag`` builds a new
#: IntFlag object every time, a large share of the cost of reading a chain.
F_NEXT, F_WRITE, F_INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
F_AVAIL, F_USED = int(DescFlag.AVAIL), int(DescFlag.USED)


class AvailFlag(IntFlag):
    """Split avail ring flags (written by the driver)."""

    NO_INTERRUPT = 1


class UsedFlag(IntFlag):
    """Split used ring flags (written by the device)."""

    NO_NOTIFY = 1


class EventFlag(IntEnum):
    """Packed ring event suppression modes."""

    ENABLE = 0
    DISABLE = 1
    DESC = 2


#: Wrap counter bit of a packed event offset and of packed GET/SET_VRING_BASE halves.
WRAP_BIT = 1 << 15


def split_ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the (descriptor table, avail ring, used ring) of a split queue."""
    if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise VirtioError(f"split queue size {size} is not a power of 2 up to {MAX_QUEUE_SIZE}")
    return DESC_SIZE * size, 6 + 2 * size, 6 + USED_ELEM.size * size


def packed_ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the (descriptor ring, driver area, device area) of a packed queue."""
    if not 0 < size <= MAX_QUEUE_SIZE:
        raise VirtioError(f"packed queue size {size} is not within 1..{MAX_QUEUE_SIZE}")
    return DESC_SIZE * size, EVENT_SUPPRESS.size, EVENT_SUPPRESS.size


def need_event(event: int, new: int, old: int) -> bool:
    """Split EVENT_IDX rule: True if 16-bit index `event` lies in the window [old, new)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def split_notification_wanted(
    *, event_idx: bool, suppressed: bool, event: int, new: int, count: int
) -> bool:
    """Whether the other side of a split ring wants a notification.

    `count` entries were published since the last check, bringing our index to `new`;
    `suppressed` is the other side's NO_INTERRUPT/NO_NOTIFY flag and `event` its
    used_event/avail_event field (which replaces the flag when EVENT_IDX is on).
    """
    if event_idx:
        # Past 65535 entries the 16-bit window no longer says anything: notify.
        return count > 0xFFFF or need_event(event, new, (new - count) & 0xFFFF)
    return not suppressed


def write_split_suppression(
    ring: memoryview, *, flag: int, event_offset: int, enabled: bool, event_idx: bool, idx: int
) -> None:
    """Ask the other side of a split ring for notifications (or not).

    Without EVENT_IDX this sets or clears `flag` in the ring's flags field. With it,
    the event field becomes `idx` (notify when you pass it) or, to disable, `idx - 1`,
    which is only reached again after 65535 more entries.
    """
    if event_idx:
        U16.pack_into(ring, event_offset, idx if enabled else (idx - 1) & 0xFFFF)
    else:
        U16.pack_into(ring, 0, 0 if enabled else flag)


def ring_position(pos: int, wrap: bool, size: int) -> int:
    """Place (position, wrap counter) of a packed ring on the 2*size cycle they run through."""
    return pos if wrap else pos + size


def off_wrap(pos: int, wrap: bool) -> int:
    """Encode a packed ring position and its wrap counter in 16 bits."""
    return pos | (WRAP_BIT if wrap else 0)


def packed_need_event(event: int, new: int, old: int, size: int) -> bool:
    """Packed EVENT_IDX rule: True if descriptor `event` (an `off_wrap` value) lies in
    [old, new), both `ring_position` values less than 2*size descriptors apart."""
    position = ring_position(event & ~WRAP_BIT, bool(event & WRAP_BIT), size)
    cycle = 2 * size
    return (position - old) % cycle < (new - old) % cycle


def packed_notification_wanted(
    area: memoryview, *, event_idx: bool, pos: int, wrap: bool, count: int, size: int
) -> bool:
    """Whether the other side of a packed ring wants a notification.

    `area` is the other side's event suppression structure; `count` descriptors were
    made available/used since the last check, bringing us to (`pos`, `wrap`).
    """
    event, flags = EVENT_SUPPRESS.unpack_from(area, 0)
    mode = flags & 0x3
    if mode == EventFlag.DISABLE:
        return False
    if mode == EventFlag.DESC and event_idx and count < 2 * size:
        new = ring_position(pos, wrap, size)
        return packed_need_event(event, new, (new - count) % (2 * size), size)
    return True  # ENABLE, or a mode we cannot honour: notifying is always safe


def write_packed_suppression(
    area: memoryview, *, enabled: bool, event_idx: bool, pos: int, wrap: bool
) -> None:
    """Fill our event suppression structure: disabled, enabled, or (with EVENT_IDX)
    enabled for the descriptor at (`pos`, `wrap`) only."""
    if not enabled:
        mode = EventFlag.DISABLE
    elif event_idx:
        U16.pack_into(area, EVENT_OFF_WRAP_OFFSET, off_wrap(pos, wrap))
        mode = EventFlag.DESC
    else:
        mode = EventFlag.ENABLE
    U16.pack_into(area, EVENT_FLAGS_OFFSET, mode)


def is_available(flags: int, wrap: bool) -> bool:
    """True if a packed descriptor's flags mark it available for wrap counter `wrap`."""
    return bool(flags & F_AVAIL) == wrap and bool(flags & F_USED) != wrap


def is_used(flags: int, wrap: bool) -> bool:
    """True if a packed descriptor's flags mark it used for wrap counter `wrap`."""
    return bool(flags & F_AVAIL) == wrap and bool(flags & F_USED) == wrap


def avail_used_bits(wrap: bool, *, used: bool) -> int:
    """The AVAIL/USED flag bits that mark a packed descriptor available or used."""
    used_bit_set = wrap if used else not wrap
    return (F_AVAIL if wrap else 0) | (F_USED if used_bit_set else 0)


class Fence:
    """A full memory barrier, for the store-then-load steps of notification suppression.

    Python has no fence primitive, but acquiring and releasing an uncontended lock runs
    atomic read-modify-write instructions, which order all earlier loads and stores
    before all later ones. Each ring owns one so that queues never contend.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self) -> None:
        self._lock.acquire()
        self._lock.release()
