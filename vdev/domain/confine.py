"""Confining a driver-domain child: network namespace, user, no_new_privs, seccomp.

The child calls these in order: `enter_netns` (before the backend is built, so that a
TAP is created inside the namespace), then, once the backend holds what it needs
(open files, TAP fds), `drop_user` and `apply_seccomp`. Nothing is imported after the
drop, since the new user may not be able to read the Python installation.

The seccomp filter uses libseccomp (Debian's libseccomp2, which apt itself depends
on) through ctypes, so it works in any virtualenv; its Python bindings
(python3-seccomp) only exist for Debian's own interpreter. It is a deny list: a
Python backend may legitimately use most of the kernel, but never needs to execute
programs, fork, trace, mount, load modules or change namespaces. A block backend
creates no sockets either (`BLOCK_DENIED_SYSCALLS`; io_uring too, whose requests the
filter cannot see): one that talks to a server must connect while it is built.

What stays allowed: threads, memory mappings, the fds the child holds (its files,
TAP, the channel and the control socket, sockets a backend opened while it was
built), and file system calls: a confined child can still open any file its user
may open (world-readable ones with `domain-user`). A net child can still create
sockets: give it a network namespace of its own (`domain-netns`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd

log = logging.getLogger(__name__)

LIBSECCOMP = "libseccomp.so.2"
PR_SET_NO_NEW_PRIVS = 38
CLONE_THREAD = 0x00010000

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
SCMP_CMP_MASKED_EQ = 7
SCMP_FLTATR_CTL_TSYNC = 4

#: System calls the filter refuses (EPERM). Names this kernel/arch lacks are skipped.
DENIED_SYSCALLS = (
    # new programs and processes (threads stay allowed: see `apply_seccomp`)
    "execve", "execveat", "fork", "vfork",
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # mounts, namespaces, root directory
    "mount", "umount2", "pivot_root", "chroot", "setns", "unshare",
    "fsopen", "fsmount", "fsconfig", "fspick", "move_mount", "open_tree", "mount_setattr",
    # the kernel itself
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "iopl", "ioperm", "syslog",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "open_by_handle_at", "name_to_handle_at", "personality",
)  # fmt: skip
#: Also refused to block children: creating sockets, directly or through io_uring.
BLOCK_DENIED_SYSCALLS = ("socket", "socketpair", "io_uring_setup")


class ConfineError(Exception):
    """The child could not be confined as asked."""


def lookup_user(user: str) -> pwd.struct_passwd:
    """The password entry of a user name or numeric uid; ConfineError if unknown."""
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ConfineError(f"domain-user: no user named {user!r}") from None


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into the named network namespace."""
    from pyroute2 import netns

    try:
        netns.setns(name, flags=0)
    except OSError as exc:
        raise ConfineError(f"domain-netns: cannot enter {name!r}: {exc.strerror}") from None


def drop_user(user: str) -> None:
    """Become `user` (its uid and gid, no supplementary groups) for good."""
    entry = lookup_user(user)
    try:
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise ConfineError(f"domain-user: cannot become {user!r}: {exc.strerror}") from None
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - only if the kernel ignored setuid
        raise ConfineError(f"domain-user: still able to regain root after becoming {user!r}")


def no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: no exec can grant privileges (setuid binaries, file caps)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise ConfineError(f"prctl(NO_NEW_PRIVS): {os.strerror(err)}")


class _ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _libseccomp() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(LIBSECCOMP, use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    return lib


def seccomp_available() -> bool:
    return _libseccomp() is not None


def apply_seccomp(*, sockets: bool = True) -> None:
    """Install the deny-list filter on every thread of this process; without
    `sockets`, `BLOCK_DENIED_SYSCALLS` too.

    clone() without CLONE_THREAD (a new process) is refused; clone3 answers ENOSYS so
    that the C library falls back to clone for threads, whose flags a filter can see.
    """
    lib = _libseccomp()
    if lib is None:
        raise ConfineError("seccomp: libseccomp (Debian package libseccomp2) is not installed")
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise ConfineError("seccomp: seccomp_init failed")
    try:
        _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1), "attr TSYNC")
        deny = SCMP_ACT_ERRNO | errno.EPERM
        for name in DENIED_SYSCALLS + (() if sockets else BLOCK_DENIED_SYSCALLS):
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number >= 0:
                _check(lib.seccomp_rule_add_array(ctx, deny, number, 0, None), name)
        clone = lib.seccomp_syscall_resolve_name(b"clone")
        new_process = _ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0)
        _check(lib.seccomp_rule_add_array(ctx, deny, clone, 1, ctypes.byref(new_process)), "clone")
        clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
        if clone3 >= 0:
            enosys = SCMP_ACT_ERRNO | errno.ENOSYS
            _check(lib.seccomp_rule_add_array(ctx, enosys, clone3, 0, None), "clone3")
        _check(lib.seccomp_load(ctx), "load")
    finally:
        lib.seccomp_release(ctx)


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise ConfineError(f"seccomp: {what}: {os.strerror(-rc)}")
