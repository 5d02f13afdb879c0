"""Fixtures of the driver-domain tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from domain_helpers import IMAGE_SIZE
from domain_plugins import install_plugins


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """An image of zeros, for a file backend."""
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Install the test backends of domain_plugins as a third-party distribution, for
    this process and for the driver-domain children it starts."""
    site = tmp_path / "site"
    site.mkdir()
    install_plugins(site)
    here = str(Path(__file__).parent)
    monkeypatch.syspath_prepend(str(site))
    path = os.pathsep.join(filter(None, [str(site), here, os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    yield
