"""Live migration of a real guest with a vdev NIC: two QEMUs, each with its own
`vdev run net --backend responder` daemon (a pretend host that answers ARP and ping);
the guest pings it all along, and keeps getting answers on the destination."""

from __future__ import annotations

import re
from pathlib import Path

import trio
from migration_helpers import migrated, qmp_args

from vdev.qemu import render_args
from vdev.testing.pytest_plugin import DaemonFactory, GuestRunner

PINGS = 150
#: Lost across the switch-over, at most (the guest is paused for the downtime).
LOST_AT_MOST = 10
PEER = "10.68.0.1"

SCRIPT = f"""
set -e
ip link set eth0 address 52:54:00:68:00:02
ip addr add 10.68.0.2/24 dev eth0
ip link set eth0 up
n=0
until ping -c 1 -W 1 {PEER} > /dev/null 2>&1; do
    n=$((n + 1)); [ $n -lt 60 ] || {{ echo "no answer from {PEER}"; exit 1; }}
done
echo READY
ping -c {PINGS} -i 0.1 -W 5 {PEER} | tail -n 2
"""


def nic_args(socket: Path) -> list[str]:
    return render_args("vdev-net", id="net0", socket=socket, queues=1, mq=False)


async def test_a_guest_keeps_pinging_across_live_migration(
    vdev_daemon: DaemonFactory, vdev_guest: GuestRunner, vdev_socket_dir: Path
) -> None:
    responder = ("net", "--backend", "responder", "-o", f"address={PEER}/24")
    source_daemon = await vdev_daemon(*responder)
    target_daemon = await vdev_daemon(*responder)
    args = [*nic_args(source_daemon.socket), *qmp_args(vdev_socket_dir / "qmp-src.sock")]
    async with vdev_guest.start(SCRIPT, qemu_args=args) as source:
        with trio.fail_after(120):
            await source.wait_for("READY")
        await trio.sleep(2)  # some pings answered on the source
        async with migrated(source, vdev_socket_dir, nic_args(target_daemon.socket)) as target:
            with trio.fail_after(120):
                result = await target.wait()
    assert result.exit_code == 0, result.console
    match = re.search(r"(\d+) packets transmitted, (\d+) packets received", result.output)
    assert match is not None, result.output
    sent, received = map(int, match.groups())
    assert sent == PINGS and received >= PINGS - LOST_AT_MOST, result.output
    assert "dirty logging on" in source_daemon.log_text()
