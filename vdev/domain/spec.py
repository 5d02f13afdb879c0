"""Where a device's backend runs, as the user chose it (`--domain ...`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DomainKind = Literal["inprocess", "driver"]
MemoryPolicy = Literal["map", "copy"]

DOMAIN_KINDS: tuple[DomainKind, ...] = ("inprocess", "driver")
MEMORY_POLICIES: tuple[MemoryPolicy, ...] = ("map", "copy")


@dataclass(frozen=True)
class DomainSpec:
    """`inprocess`: the backend lives in the vdev process. `driver`: in a child process.

    `memory` (driver only): `map` lets the child map guest memory and receive
    references (zero copy); `copy` keeps guest memory out of the child, data going
    through a bounce buffer. `user` and `netns` confine the child further; `seccomp`
    (driver only, on by default) loads a system-call filter in the child when
    libseccomp is installed. `watchdog`: seconds a serving child may go without
    answering the core's pings before it is killed and replaced (0: never).
    """

    kind: DomainKind = "inprocess"
    memory: MemoryPolicy = "map"
    user: str | None = None
    netns: str | None = None
    seccomp: bool = True
    watchdog: float = 5.0

    def __post_init__(self) -> None:
        if self.kind not in DOMAIN_KINDS:
            raise ValueError(f"domain must be one of {', '.join(DOMAIN_KINDS)}, not {self.kind!r}")
        if self.memory not in MEMORY_POLICIES:
            raise ValueError(
                f"domain memory must be one of {', '.join(MEMORY_POLICIES)}, not {self.memory!r}"
            )
        if not isinstance(self.seccomp, bool):
            raise ValueError(f"domain seccomp must be true or false, not {self.seccomp!r}")
        if (
            not isinstance(self.watchdog, int | float)
            or isinstance(self.watchdog, bool)
            or not 0 <= self.watchdog < 1e6
        ):
            raise ValueError(f"domain watchdog must be seconds (0: off), not {self.watchdog!r}")
        if self.kind == "inprocess" and (self.user or self.netns or self.memory != "map"):
            raise ValueError("domain-memory, domain-user and domain-netns need --domain driver")
