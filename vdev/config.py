"""Device specifications: what `vdev run` serves, from CLI options or a TOML file.

A TOML config lists devices; every key that is not one of the spec's own fields is an
option for the device or its backend::

    [[device]]
    type = "blk"              # a `vdev.devices` plugin: blk, net, or a raw device
    socket = "/run/vdev/disk0.sock"
    backend = "file"          # a `vdev.blk_backends` / `vdev.net_backends` plugin
    path = "disk.img"         # backend option
    queues = 2                # device option
    domain = "driver"         # optional: or { kind = "driver", memory = "copy", user = "nobody" }
"""

from __future__ import annotations

import inspect
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdev.backend import BackendError
from vdev.devices.base import Device
from vdev.domain.confine import ConfineError, lookup_user
from vdev.domain.host import DomainError
from vdev.domain.proxy import attach, open_backend
from vdev.domain.spec import DomainSpec
from vdev.plugins import Kind, PluginError, load


class ConfigError(Exception):
    """A device specification is wrong; the message names the file/option at fault."""


#: Which backend registry a device type draws from.
BACKEND_KINDS = {"blk": Kind.BLK_BACKEND, "net": Kind.NET_BACKEND}

_SPEC_KEYS = {"type", "socket", "backend", "client", "domain"}


@dataclass(frozen=True)
class DeviceSpec:
    """One device to serve: its type, socket, backend and options."""

    type: str
    socket: Path
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    client: bool = False
    domain: DomainSpec = field(default_factory=DomainSpec)


def load_config(path: Path) -> list[DeviceSpec]:
    """Read a TOML file of `[[device]]` tables."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    unknown = set(data) - {"device"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    tables = data.get("device")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no [[device]] tables")
    specs = []
    for n, table in enumerate(tables, 1):
        where = f"{path}: device #{n}"
        for key in ("type", "socket"):
            if not isinstance(table.get(key), str):
                raise ConfigError(f"{where}: '{key}' (a string) is required")
        options = {k: v for k, v in table.items() if k not in _SPEC_KEYS}
        domain = _domain_from_toml(table.get("domain", "inprocess"), where)
        specs.append(
            DeviceSpec(
                type=table["type"],
                socket=Path(table["socket"]),
                backend=table.get("backend"),
                options=options,
                client=bool(table.get("client", False)),
                domain=domain,
            )
        )
    sockets = [s.socket for s in specs]
    if len(set(sockets)) != len(sockets):
        raise ConfigError(f"{path}: two devices share a socket path")
    return specs


def build_device(spec: DeviceSpec) -> Device:
    """Instantiate the device (and its backend) a spec describes.

    Options go to whichever of the device and the backend constructors accept them
    (both, for one like `mtu`); an option neither accepts is an error naming it.
    """
    try:
        device_cls = load(Kind.DEVICE, spec.type)
        backend_kind = BACKEND_KINDS.get(spec.type)
        backend_cls = load(backend_kind, spec.backend) if backend_kind and spec.backend else None
    except PluginError as exc:
        raise ConfigError(str(exc)) from exc
    if backend_kind is None:
        if spec.backend is not None:
            raise ConfigError(f"device type {spec.type!r} takes no backend")
        if spec.domain.kind == "driver":
            raise ConfigError(f"device type {spec.type!r} has no backend to run in a driver domain")
        _check_options(spec.options, _accepted(device_cls), f"device {spec.type!r}")
        return _construct(device_cls, (), spec.options, f"device {spec.type!r}")
    if backend_cls is None:
        raise ConfigError(f"device type {spec.type!r} needs a backend (--backend)")
    device_keys = _accepted(device_cls) - {"backend"}
    backend_keys = _accepted(backend_cls)
    _check_options(
        spec.options, device_keys | backend_keys, f"{spec.type} device / {spec.backend} backend"
    )
    backend_opts = {k: v for k, v in spec.options.items() if k in backend_keys}
    device_opts = {k: v for k, v in spec.options.items() if k in device_keys}
    if spec.domain.kind == "driver":
        backend = _driver_backend(backend_kind, spec, backend_opts)
    else:
        backend = _construct(backend_cls, (), backend_opts, f"{spec.backend} backend")
    try:
        device = _construct(device_cls, (backend,), device_opts, f"{spec.type} device")
    except ConfigError:
        backend.close()
        raise
    if spec.domain.kind == "driver":
        attach(device, backend)
    return device


def _driver_backend(kind: Kind, spec: DeviceSpec, options: dict[str, Any]) -> Any:
    """The proxy of a backend started in a driver domain (a child process)."""
    assert spec.backend is not None
    if spec.domain.user is not None:
        try:
            lookup_user(spec.domain.user)
        except ConfineError as exc:
            raise ConfigError(str(exc)) from None
    try:
        return open_backend(kind, spec.backend, options, spec.domain)
    except DomainError as exc:
        raise ConfigError(f"{spec.backend} backend: {exc}") from exc


def _domain_from_toml(value: object, where: str) -> DomainSpec:
    try:
        if isinstance(value, str):
            return DomainSpec(kind=value)  # type: ignore[arg-type]
        if isinstance(value, dict):
            return DomainSpec(**value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: domain: {exc}") from exc
    raise ConfigError(f"{where}: domain must be a string or a table")


def _accepted(cls: type) -> set[str]:
    params = inspect.signature(cls).parameters.values()
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _check_options(options: dict[str, Any], accepted: set[str], what: str) -> None:
    unknown = set(options) - accepted
    if unknown:
        names = ", ".join(sorted(unknown))
        raise ConfigError(f"option(s) {names} not accepted by {what}")


def _construct(cls: type, args: tuple[Any, ...], options: dict[str, Any], what: str) -> Any:
    try:
        return cls(*args, **options)
    except (BackendError, ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {exc}") from exc
