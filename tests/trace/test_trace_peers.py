"""`vdev trace` between real peers: QEMU booting a guest on a vdev disk, and DPDK testpmd
(virtio-user) against vdev's echo backend. Every process is the real command line.

They skip only when QEMU or testpmd is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from vdev.bench import net
from vdev.bench.core import daemon
from vdev.bench.net import vdev_cli
from vdev.qemu import render_args
from vdev.testing.guest import run_guest

SIZE = 8 << 20


def read_trace(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def requests(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The front-end's `name` requests."""
    return [
        r for r in records if r["request"] == name and r["direction"] == "front-end -> back-end"
    ]


def check_negotiation(records: list[dict[str, Any]], memory_request: str, queues: int) -> None:
    """What every front-end says before using a device, checked field by field."""
    assert not [r for r in records if "error" in r], [r for r in records if "error" in r]
    replies = [r for r in records if r["request"] == "GET_FEATURES" and r["flags"] == ["REPLY"]]
    assert replies and all(r["fields"] == replies[0]["fields"] for r in replies)
    offered = replies[0]
    offered_names = offered["fields"]["features"]["names"]
    assert {"VERSION_1", "PROTOCOL_FEATURES"} <= set(offered_names)
    acked = requests(records, "SET_FEATURES")[-1]["fields"]["features"]
    assert "VERSION_1" in acked["names"] and set(acked["names"]) <= set(offered_names)
    # Guest memory, one fd per region: QEMU sends ADD_MEM_REG once CONFIGURE_MEM_SLOTS is
    # negotiated, DPDK's virtio-user a whole SET_MEM_TABLE.
    [memory] = requests(records, memory_request)
    regions = (
        memory["fields"]["regions"] if memory_request == "SET_MEM_TABLE" else [memory["fields"]]
    )
    assert regions and len(memory["fds"]) == len(regions)
    assert all(int(r["size"], 16) > 0 for r in regions)
    addrs = requests(records, "SET_VRING_ADDR")
    assert addrs and all(int(a["fields"]["desc"], 16) for a in addrs)
    kicks = requests(records, "SET_VRING_KICK")
    assert kicks and all(len(k["fds"]) == 1 and k["fields"]["fd"] for k in kicks)
    assert {k["fields"]["index"] for k in kicks} == set(range(queues))


@pytest.mark.requires_qemu
async def test_trace_qemu_booting_a_guest_on_a_vdev_disk(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    content = os.urandom(SIZE)
    image.write_bytes(content)
    disk, traced, out = tmp_path / "disk.sock", tmp_path / "trace.sock", tmp_path / "trace.json"
    run = vdev_cli("run", "blk", "--socket", str(disk), "--backend", "file", "--path", str(image))
    trace = vdev_cli(
        "trace", "--listen", str(traced), "--connect", str(disk), "--device", "blk",
        "--json", "--output", str(out),
    )  # fmt: skip
    script = "dd if=/dev/vda bs=1M 2>/dev/null | sha256sum\n"
    async with (
        daemon(run, disk, tmp_path / "vdev.log"),
        daemon(trace, traced, tmp_path / "trace.log") as tracer,
    ):
        result = await run_guest(
            script, qemu_args=render_args("vdev-blk", id="disk0", socket=traced, queues=1)
        )
        assert tracer.poll() is None, (tmp_path / "trace.log").read_text()
    assert result.exit_code == 0, result.console
    assert result.output.split()[0] == hashlib.sha256(content).hexdigest()

    records = read_trace(out)
    check_negotiation(records, "ADD_MEM_REG", queues=1)
    assert {r["connection"] for r in records} == {1}
    offered = next(r for r in records if r["request"] == "GET_FEATURES" and r["flags"])
    assert "FLUSH" in offered["fields"]["features"]["names"]  # --device blk names it
    [config] = [r for r in records if r["request"] == "GET_CONFIG" and r["flags"] == ["REPLY"]]
    capacity = bytes.fromhex(config["fields"]["data"])[:8]
    assert int.from_bytes(capacity, "little") == SIZE // 512  # sectors, as the guest read them


@pytest.mark.requires_testpmd
async def test_trace_testpmd_against_vdev_echo(tmp_path: Path) -> None:
    nic, traced, out = tmp_path / "nic.sock", tmp_path / "trace.sock", tmp_path / "trace.json"
    run = vdev_cli("run", "net", "--socket", str(nic), "--backend", "echo")
    trace = vdev_cli(
        "trace", "--listen", str(traced), "--connect", str(nic), "--device", "net",
        "--json", "--output", str(out),
    )  # fmt: skip
    argv = net.testpmd_argv(
        net.virtio_user(traced),
        prefix=f"vdevtrace-{os.getpid()}",
        lcores="0,1",
        forward_mode="io",
    )
    async with (
        daemon(run, nic, tmp_path / "vdev.log"),
        daemon(trace, traced, tmp_path / "trace.log"),
        net.run_testpmd(argv) as pmd,
    ):
        await pmd.command("start tx_first 4")
        with trio.fail_after(30):  # frames go round through the echo port
            while not (await pmd.port_stats()).rx_packets:
                await trio.sleep(0.05)
        await pmd.command("stop")

    records = read_trace(out)
    check_negotiation(records, "SET_MEM_TABLE", queues=2)
    offered = next(r for r in records if r["request"] == "GET_FEATURES" and r["flags"])
    assert "MRG_RXBUF" in offered["fields"]["features"]["names"]  # --device net names it
    enables = requests(records, "SET_VRING_ENABLE")
    assert {e["fields"]["index"] for e in enables} == {0, 1}  # the rx and tx queues
    assert any(e["fields"]["enable"] == 1 for e in enables)
