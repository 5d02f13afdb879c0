"""A small QMP client for tests: drive a running QEMU (migration, stop, cont) from trio.

QEMU must listen with ``-qmp unix:PATH,server=on,wait=off``::

    async with QmpClient.connect(path) as qmp:
        await qmp.execute("migrate", uri="unix:/tmp/mig.sock")
        await qmp.wait_migration()

Replies and events arrive on the same stream: `execute` returns its command's
``return`` value (QmpError for an ``error``) and passes over the events it reads
meanwhile (migration progress is polled with query-migrate).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

#: How long `connect` waits for QEMU to create its socket.
CONNECT_TIMEOUT = 30.0


class QmpError(RuntimeError):
    """QEMU answered a command with an error, or the stream broke."""


class QmpClient:
    """One QMP session (capabilities negotiated)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, path: str | Path, timeout: float = CONNECT_TIMEOUT
    ) -> AsyncIterator[QmpClient]:
        """Connect to QEMU's QMP socket (waiting for it to appear) and negotiate."""
        with trio.fail_after(timeout):
            while True:
                try:
                    stream = await trio.open_unix_socket(str(path))
                    break
                except OSError:
                    await trio.sleep(0.05)
        async with stream:
            client = cls(stream)
            greeting = await client._read()
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting}")
            await client.execute("qmp_capabilities")
            yield client

    async def execute(self, command: str, **arguments: object) -> Any:
        """Run `command` and return its result; QmpError if QEMU reports an error."""
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        await self._stream.send_all(json.dumps(request).encode() + b"\n")
        while True:
            message = await self._read()  # events that come meanwhile are not needed
            if "error" in message:
                error = message["error"]
                raise QmpError(f"{command}: {error.get('class')}: {error.get('desc')}")
            elif "return" in message:
                return message["return"]

    async def wait_migration(self, timeout: float = 300.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll query-migrate until the migration completes; its final state.

        QmpError if it fails or is cancelled (with QEMU's error description).
        """
        with trio.fail_after(timeout):
            while True:
                info = await self.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    return info  # type: ignore[no-any-return]
                if status in ("failed", "cancelled"):
                    raise QmpError(f"migration {status}: {info.get('error-desc', info)}")
                await trio.sleep(poll)

    async def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise QmpError("QEMU closed the QMP connection")
            self._buffer += chunk
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QmpError(f"unexpected QMP message: {message!r}")
        return message
