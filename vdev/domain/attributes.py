"""Attributes a driver-domain child reports about its backend, checked before use."""

from __future__ import annotations

from typing import Any

from vdev.domain.host import DomainError


def attribute(attrs: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = attrs.get(name, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DomainError(f"the driver domain reported {name}={value!r}")
    return value
