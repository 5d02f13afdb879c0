"""Fixtures for the sans-I/O protocol tests."""

from __future__ import annotations

import pytest
from protocol_helpers import FdLedger, Session


@pytest.fixture
def ledger() -> FdLedger:
    return FdLedger()


@pytest.fixture
def session(ledger: FdLedger) -> Session:
    negotiated = Session(ledger)
    negotiated.negotiate()
    return negotiated
