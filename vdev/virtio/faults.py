"""Survive SIGBUS on guest memory: a front-end's broken memory fails its session only.

Guest memory is a shared mapping of a file the front-end owns. If the front-end shrinks
that file after sending it (ftruncate), touching a mapped page past the new end raises
SIGBUS on the thread that touched it, and SIGBUS kills the process by default: one
hostile or buggy front-end would take down every device of the daemon.

`guard` registers a range; the first registration installs, with `sigaction`
(SA_SIGINFO), a process-wide SIGBUS handler. On a fault the kernel raised
(``si_code > 0``) at an address inside a live registered range, the handler maps a
private, zero-filled anonymous page over the faulting one (MAP_FIXED), so that the
access completes when the handler returns: reads see zeros, writes go nowhere the
front-end sees. It notes the first fault in the range's `FaultRecord` and returns.
Anything else (an address outside guest memory, a SIGBUS sent with kill) is a real bug
or a real request: the handler puts back the action that was in place before it (the
default, or faulthandler's) and lets the signal take its course, so it ends as it would
have without the guard. Nothing is reported from inside the handler: the owner looks at
its record (`GuestMemory.check`) outside it.

Why a ctypes callback may serve as this handler (checked against CPython 3.11's
sources and tested; 3.12 and 3.13 have the same ``PyGILState_Ensure``; free-threaded
builds are not considered):

- SIGBUS from a memory access is synchronous: the kernel delivers it to the thread that
  faulted, at the faulting instruction. In vdev that is C code copying guest memory
  through the buffer protocol (a memoryview copy, struct unpack, bytes()...) on a thread
  that runs Python: the main thread or a worker thread alike.
- The ctypes thunk starts with ``PyGILState_Ensure``. On a thread that holds the GIL
  (the usual case: the copy runs with the GIL held) it finds the thread's own thread
  state in TSS, sees that it is the current one, and increments a counter: nothing is
  locked, and ``PyGILState_Release`` undoes just that. If the thread had released the GIL
  around the copy (zlib or hashlib do on large buffers), Ensure takes the GIL as any
  thread would, and Release gives it back.
- The Python code then runs on the faulting thread's stack, nested in the interrupted C
  function. The thunk allocates a few small objects (the arguments) and so does the
  handler; that is safe because the interrupted code is a copy loop, never the
  allocator, the GC or the eval loop's own bookkeeping, and the objects it works on are
  pinned by the buffer protocol. The handler keeps to a minimum: it scans a tuple of
  entries that is replaced whole (never mutated), calls libc ``mmap`` through a
  function pointer prepared in advance (a PyDLL one: the GIL stays held, so no other
  thread can close the owning mmap and reuse its addresses meanwhile), and stores two
  attributes. It takes no lock: a lock held by a thread that waits for the GIL would
  deadlock. It logs nothing.

Limits:

- Linux on x86_64 and aarch64 only (the `sigaction` and `siginfo_t` layouts are
  declared here); elsewhere `install` logs a warning and such faults still kill.
- A SIGBUS handler installed after ours replaces it: enable faulthandler before guest
  memory is first mapped (``python -X faulthandler`` and pytest do), not after.
- A thread with no Python thread state (a native thread of some extension) would get a
  new one from PyGILState_Ensure, which is not async-signal-safe. vdev has none.
- If the interrupted code had a Python exception pending, the callback machinery may
  report and clear it. Copies of guest memory do not run with one pending.
- A Python signal handler due on the main thread (Ctrl-C at the very moment of a
  fault) may run inside ours and raise: ours then gives up and the fault kills.
- System calls that touch a truncated page (preadv into it, writev from it) raise no
  SIGBUS: they fail with EFAULT, an ordinary OSError, and record nothing here.
- A repair covers one page (the range's page size: a huge page on hugetlbfs) and is a
  new mapping; the kernel merges adjacent ones, but faults scattered over a very large
  range could reach vm.max_map_count, after which a repair fails and the fault kills.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import platform
import signal
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import NamedTuple

logger = logging.getLogger(__name__)

_SUPPORTED = sys.platform == "linux" and platform.machine() in {"x86_64", "aarch64"}
_SA_SIGINFO = 4
_MAP_FIXED = 0x10  # Linux x86_64 and aarch64; Python's mmap module lacks it
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_REPAIR_FLAGS = _MAP_FIXED | mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_MAP_FAILED = ctypes.c_void_p(-1).value


@dataclass(frozen=True, slots=True)
class GuardedRange:
    """An address range mapped from a file, whose faults are to be repaired."""

    start: int
    length: int
    #: The mapping's page size, a repair's size; `start` and `length` are multiples of it.
    page: int
    #: The file offset mapped at `start` (for messages).
    offset: int
    #: What the range is (for messages).
    label: str

    def file_offset(self, address: int) -> int:
        return self.offset + address - self.start


class FaultRecord:
    """The first SIGBUS on the ranges of one owner; written by the signal handler."""

    __slots__ = ("address", "where")

    def __init__(self) -> None:
        #: Faulting address (stored last: a reader that sees it sees `where` too).
        self.address: int | None = None
        self.where: GuardedRange | None = None


class _Entry(NamedTuple):
    start: int
    end: int
    page: int
    where: GuardedRange
    record: FaultRecord
    #: The mmap that owns the range: once it is closed or freed, the range is not ours.
    owner: weakref.ref[mmap.mmap]


class _SigInfo(ctypes.Structure):
    """The head of Linux's ``siginfo_t`` (the fields a SIGBUS handler reads)."""

    _fields_ = [
        ("si_signo", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("si_addr", ctypes.c_void_p),  # aligned to 8: offset 16, as in the kernel's
    ]


class _SigAction(ctypes.Structure):
    """glibc's (and musl's) ``struct sigaction`` on Linux."""

    _fields_ = [
        ("sa_sigaction", ctypes.c_void_p),
        ("sa_mask", ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong))),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    ]


# PyDLL: calls keep the GIL (see the module docstring); use_errno: the C errno of the
# interrupted code is saved and restored around each call.
_libc = ctypes.PyDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_sigaction = _libc.sigaction
_sigaction.restype = ctypes.c_int
_sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_raise = _libc["raise"]
_raise.restype = ctypes.c_int
_raise.argtypes = [ctypes.c_int]

_table: tuple[_Entry, ...] = ()
_lock = threading.RLock()  # writers only; RLock: finalizers may run while it is held
_previous = _SigAction()
_previous_ptr = ctypes.addressof(_previous)
_installed: bool | None = None  # None: not tried yet


def map_fixed(address: int, length: int, flags: int, fd: int, offset: int) -> None:
    """``mmap(address, length, PROT_READ | PROT_WRITE, flags | MAP_FIXED, fd, offset)``.

    For callers that map over a range they own (Python's mmap cannot map at an address).
    """
    if _mmap(address, length, _PROT_RW, flags | _MAP_FIXED, fd, offset) == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def guard(owner: mmap.mmap, where: GuardedRange, record: FaultRecord) -> None:
    """Repair SIGBUS in `where`, part of `owner`'s range, and note the first in `record`.

    The range is ignored from when `owner` is closed, and forgotten when it is freed.
    """
    global _table
    entry = _Entry(
        where.start, where.start + where.length, where.page, where, record, weakref.ref(owner)
    )
    with _lock:
        _table = (*_table, entry)
    weakref.finalize(owner, _forget, entry)
    install()


def _forget(entry: _Entry) -> None:
    global _table
    with _lock:
        _table = tuple(e for e in _table if e is not entry)


def _repair(address: int) -> bool:
    """Map a zero page over `address` if it is guest memory; whether it was."""
    for start, end, page, where, record, owner_ref in _table:
        if start <= address < end:
            owner = owner_ref()
            if owner is None or owner.closed:
                continue  # a stale entry: the range may belong to someone else now
            if _mmap(address & -page, page, _PROT_RW, _REPAIR_FLAGS, -1, 0) == _MAP_FAILED:
                return False
            if record.address is None:
                record.where = where
                record.address = address
            return True
    return False


def _on_sigbus(signo: int, info: int, context: int | None) -> None:
    code = 0
    try:
        siginfo = _SigInfo.from_address(info)
        code = siginfo.si_code
        if code > 0 and _repair(siginfo.si_addr or 0):
            return
    except BaseException:  # whatever went wrong, end as the fault would have
        pass
    _sigaction(signal.SIGBUS, _previous_ptr, None)
    if code <= 0:  # sent, not raised by a fault: it does not recur on return; resend it
        _raise(signal.SIGBUS)
    # A fault recurs when the handler returns, and meets the previous action.


_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(_on_sigbus)


def install() -> bool:
    """Install the SIGBUS handler (once per process); whether it is in place."""
    global _installed
    with _lock:
        if _installed is None:
            _installed = _install()
        return _installed


def _install() -> bool:
    if not _SUPPORTED:
        logger.warning(
            "no SIGBUS guard on %s/%s: a front-end that truncates its guest memory "
            "can kill this process",
            sys.platform,
            platform.machine(),
        )
        return False
    action = _SigAction()
    action.sa_sigaction = ctypes.cast(_HANDLER, ctypes.c_void_p).value
    action.sa_flags = _SA_SIGINFO
    if _sigaction(signal.SIGBUS, ctypes.addressof(action), _previous_ptr) != 0:
        logger.warning("cannot install the SIGBUS guard: %s", os.strerror(ctypes.get_errno()))
        return False
    logger.debug("SIGBUS guard installed")
    return True
