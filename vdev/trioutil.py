"""Small trio helpers shared by the server, the CLI and vdev.testing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def unwrap_single() -> Iterator[None]:
    """Let a lone exception out of a nursery as itself, not as an ExceptionGroup.

    Put it around an `async with trio.open_nursery()` whose body may raise (a context
    manager's `yield`, a `nursery.start` that fails): callers then catch the error
    they expect. Groups of several exceptions pass through unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from None
