"""The plugin registry: device types and backends found through entry points.

vdev's own backends register exactly like a third-party package does, in
`pyproject.toml`::

    [project.entry-points."vdev.blk_backends"]
    mydisk = "my_package.disk:MyDiskBackend"

Entry points are imported lazily, when a name is selected.

Exports: `Kind` (the entry-point groups), `Plugin` (one installed entry point),
`plugins()` (list them without importing anything), `load()` (import one by kind and
name), `PluginError` and its two cases, `PluginNotFound` (nothing of that name is
installed) and `PluginImportError` (installed, but importing it failed: the message is
one line naming the entry point, its distribution and the error).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "Kind",
    "Plugin",
    "PluginError",
    "PluginImportError",
    "PluginNotFound",
    "load",
    "plugins",
]


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


class PluginError(Exception):
    """A plugin cannot be used; the message is one line for the user."""


class PluginNotFound(PluginError, LookupError):
    """No plugin of that kind and name is installed."""


class PluginImportError(PluginError):
    """A plugin is installed but importing it raised an exception."""


@dataclass(frozen=True)
class Plugin:
    """One installed entry point: what it provides, under which name, from which package."""

    kind: Kind
    name: str
    target: str
    distribution: str
    entry_point: importlib.metadata.EntryPoint = field(repr=False, compare=False)

    def load(self) -> type:
        """Import the plugin's class; PluginImportError (one line) if that fails."""
        try:
            return self.entry_point.load()
        except (Exception, SystemExit) as exc:  # whatever the plugin's import raised
            error = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise PluginImportError(
                f"{self.kind.label} {self.name!r} (entry point {self.target!r} of "
                f"distribution {self.distribution!r}) cannot be imported: {error}"
            ) from exc


def _plugin(kind: Kind, ep: importlib.metadata.EntryPoint) -> Plugin:
    dist = ep.dist.name if ep.dist is not None else "?"
    return Plugin(kind, ep.name, ep.value, dist, ep)


def plugins(kind: Kind | None = None) -> list[Plugin]:
    """Every installed plugin (of one kind), sorted by kind and name; nothing is imported."""
    kinds = [kind] if kind else list(Kind)
    found = [_plugin(k, ep) for k in kinds for ep in importlib.metadata.entry_points(group=k.value)]
    return sorted(found, key=lambda p: (list(Kind).index(p.kind), p.name))


def load(kind: Kind, name: str) -> type:
    """The class registered under `name`.

    PluginNotFound names what is installed; PluginImportError reports a plugin whose
    import fails.
    """
    for ep in importlib.metadata.entry_points(group=kind.value, name=name):
        return _plugin(kind, ep).load()
    installed = ", ".join(sorted(p.name for p in plugins(kind))) or "none"
    raise PluginNotFound(
        f"no {kind.label} named {name!r} is installed (installed: {installed}); "
        f"a third-party one is a Python package, e.g. `pip install vdev-{name}`"
    )
