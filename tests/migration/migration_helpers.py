"""Live migration between two QEMUs for the guest tests: QMP sockets, the target."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from vdev.testing.guest import Guest, start_incoming
from vdev.testing.qmp import QmpClient

MiB = 1 << 20
#: Slow enough for the precopy to iterate (several dirty-log syncs) while the guest
#: works, fast enough to end in seconds: a 512M guest sends some 80 MB.
BANDWIDTH = 32 * MiB
#: Generous (QEMU's default is 300 ms): a guest reading 16 MiB a second into its
#: page cache dirties it faster than the precopy could otherwise catch up.
DOWNTIME_MS = 1000


def qmp_args(path: Path) -> list[str]:
    """QEMU arguments for a QMP socket at `path` (`QmpClient.connect`)."""
    return ["-qmp", f"unix:{path},server=on,wait=off"]


@asynccontextmanager
async def migrated(
    source: Guest, directory: Path, target_args: Sequence[str]
) -> AsyncIterator[Guest]:
    """Migrate `source` (started with ``qmp_args(directory / "qmp-src.sock")``) to a
    new QEMU with `target_args` (its devices) over a Unix socket in `directory`, and
    yield that target once it runs the guest and the source is paused for good."""
    qmp_source, qmp_target = directory / "qmp-src.sock", directory / "qmp-dst.sock"
    incoming = directory / "migrate.sock"
    target_args = [*target_args, *qmp_args(qmp_target)]
    async with (
        start_incoming(source, f"unix:{incoming}", target_args) as target,
        QmpClient.connect(qmp_source) as qmp,
        QmpClient.connect(qmp_target) as target_qmp,
    ):
        with trio.fail_after(30):
            while not incoming.exists():
                await trio.sleep(0.05)
        await qmp.execute(
            "migrate-set-parameters",
            **{"max-bandwidth": BANDWIDTH, "downtime-limit": DOWNTIME_MS},
        )
        await qmp.execute("migrate", uri=f"unix:{incoming}")
        await qmp.wait_migration()
        # The source is done once it sent everything; the target runs a moment later.
        with trio.fail_after(30):
            while (await target_qmp.execute("query-status"))["status"] != "running":
                await trio.sleep(0.05)
        assert (await qmp.execute("query-status"))["status"] == "postmigrate"
        yield target
