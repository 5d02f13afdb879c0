"""Fixtures of the virtio data-plane tests."""

from __future__ import annotations

import pytest

from .helpers import KINDS


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Run the test for both ring layouts."""
    return request.param
