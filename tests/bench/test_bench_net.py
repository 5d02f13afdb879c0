"""Smoke tests of the network benchmarks (vdev.bench.net) with tiny runtimes.

They check that every target and workload runs and yields figures, not what the figures
are: performance is measured by `vdev bench`, never asserted in tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from vdev import netsetup
from vdev.bench import net
from vdev.bench.core import VALUE, BenchError, BenchSettings, run_bench

TINY = BenchSettings(repetitions=1, runtime=1.0, ramp=0.2)


STATS = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 18966      RX-missed: 3          RX-bytes:  1213824
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 19094      TX-errors: 1          TX-bytes:  1222016
"""


def test_port_stats_are_parsed() -> None:
    match = net._STATS.search(STATS)
    assert match is not None
    assert net.PortStats(*map(int, match.groups())) == net.PortStats(
        18966, 3, 1213824, 19094, 1, 1222016
    )


def test_workload_names_are_unique() -> None:
    names = [w.name for w in [*net.PMD_WORKLOADS, *net.GUEST_WORKLOADS]]
    assert len(names) == len(set(names))
    assert {w.kind for w in net.PMD_WORKLOADS} == {t.kind for t in net.PMD_TARGETS} == {"pmd"}
    assert {w.kind for w in net.GUEST_WORKLOADS} == {t.kind for t in net.GUEST_TARGETS}


def test_guest_outputs_are_parsed() -> None:
    send, receive, ping = net.GUEST_WORKLOADS
    sink = f"sink {net.CHUNK} 0.5\nsink {net.CHUNK} 1.5\n"
    assert send.parse(sink)[VALUE] == pytest.approx(2 * net.CHUNK / 2.0 / net.MiB)
    got = receive.parse(f"uptime 10.00 12.00\nbytes {8 * net.MiB}\n")
    assert got[VALUE] == pytest.approx(4.0)
    pinged = ping.parse(
        "--- 10.69.0.1 ping statistics ---\n"
        "3000 packets transmitted, 2998 packets received, 0% packet loss\n"
        "round-trip min/avg/max = 0.100/0.250/2.000 ms\nseconds 2\n"
    )
    assert pinged == {VALUE: 1499.0, "rtt_us": 250.0}
    for workload in net.GUEST_WORKLOADS:
        with pytest.raises(BenchError, match=workload.name):
            workload.parse("wget: can't connect to remote host\n")
    with pytest.raises(BenchError):
        send.parse("sink 1000 0.5\n")  # a stream cut short


def test_guest_scripts_address_the_nic_first() -> None:
    for workload in net.GUEST_WORKLOADS:
        script = workload.script(TINY)
        assert script.index(net.GUEST_IP) < script.index(workload.body(TINY).strip())


@pytest.mark.requires_testpmd
async def test_pmd_bench_runs_every_target() -> None:
    workloads = [w for w in net.PMD_WORKLOADS if w.frame_size == 64]
    result = await net.run_pmd_bench(net.PMD_TARGETS, workloads, TINY)
    for target in net.PMD_TARGETS:
        for workload in workloads:
            (figures,) = result.runs[(target.name, workload.name)]
            assert figures[VALUE] > 0
            assert figures["gbit_s"] == pytest.approx(figures[VALUE] * 1000 * 64 * 8 / 1e9)
    assert result.ratio("vdev-echo", "pmd-rr-64") is not None


@pytest.mark.requires_testpmd
async def test_testpmd_failure_is_reported(tmp_path: Path) -> None:
    argv = net.testpmd_argv(
        net.virtio_user(tmp_path / "nobody.sock"),
        prefix=f"vdevtest-fail-{os.getpid()}",
        lcores="0,1",
    )
    with pytest.raises(net.TestpmdError, match="exited"):
        async with net.run_testpmd(argv):
            pass


@pytest.mark.requires_qemu
@pytest.mark.requires_root
async def test_guest_bench_runs_both_targets() -> None:
    result = await run_bench(net.GUEST_TARGETS, net.GUEST_WORKLOADS, TINY, prepare=net.no_image)
    for target in net.GUEST_TARGETS:
        for workload in net.GUEST_WORKLOADS:
            (figures,) = result.runs[(target.name, workload.name)]
            assert figures[VALUE] > 0, (target.name, workload.name)
    # The namespaces and TAPs are gone.
    assert not list(netsetup.NETNS_DIR.glob(f"vdevbench-{os.getpid()}-*"))


async def test_host_peer_needs_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    ctx = net.BenchContext(tmp_path, TINY, tmp_path, False)
    with pytest.raises(BenchError, match="root"):
        async with net.host_side(ctx):
            await trio.sleep(0)
