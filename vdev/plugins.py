"""The plugin registry: device types and backends found through entry points.

vdev's own backends register exactly like a third-party package does, in
`pyproject.toml`::

    [project.entry-points."vdev.blk_backends"]
    mydisk = "my_package.disk:MyDiskBackend"

Entry points are imported lazily, when a name is selected.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """The entry-point groups vdev reads, by what their plugins provide."""

    DEVICE = "vdev.devices"
    BLK_BACKEND = "vdev.blk_backends"
    NET_BACKEND = "vdev.net_backends"

    @property
    def label(self) -> str:
        return {"vdev.devices": "device", "vdev.blk_backends": "blk backend"}.get(
            self.value, "net backend"
        )


class PluginNotFound(LookupError):
    """No plugin of that kind and name is installed."""


@dataclass(frozen=True)
class Plugin:
    kind: Kind
    name: str
    target: str
    distribution: str


def _entry_point(kind: Kind, name: str) -> importlib.metadata.EntryPoint:
    matches = importlib.metadata.entry_points(group=kind.value, name=name)
    for ep in matches:
        return ep
    installed = ", ".join(sorted(p.name for p in plugins(kind))) or "none"
    raise PluginNotFound(
        f"no {kind.label} named {name!r} is installed (installed: {installed}); "
        f"a third-party one is a Python package, e.g. `pip install vdev-{name}`"
    )


def plugins(kind: Kind | None = None) -> list[Plugin]:
    """Every installed plugin (of one kind), sorted by kind and name."""
    kinds = [kind] if kind else list(Kind)
    found = []
    for k in kinds:
        for ep in importlib.metadata.entry_points(group=k.value):
            dist = ep.dist.name if ep.dist is not None else "?"
            found.append(Plugin(k, ep.name, ep.value, dist))
    return sorted(found, key=lambda p: (list(Kind).index(p.kind), p.name))


def load(kind: Kind, name: str) -> type:
    """The class registered under `name`; PluginNotFound names what is installed."""
    return _entry_point(kind, name).load()
