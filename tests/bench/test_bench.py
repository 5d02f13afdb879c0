"""`vdev bench` machinery with tiny sizes: parsing, medians and ratios, reports, daemons,
and one real `vdev bench --quick` run (a smoke test, not a measurement)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from vdev import qemu
from vdev.bench import blk, core, report
from vdev.bench.core import (
    VALUE,
    BenchContext,
    BenchError,
    BenchResult,
    BenchSettings,
    Target,
    Workload,
    guest_script,
    rotation,
    split_output,
)
from vdev.cli import main

MiB = 1 << 20


def fio_json(rw: str = "randread", iops: float = 2000.0, bw_bytes: int = 8 * MiB) -> str:
    """The parts of fio's JSON output that the workloads read."""
    side = {
        "iops": iops,
        "bw_bytes": bw_bytes,
        "clat_ns": {"percentile": {"50.000000": 250_000, "99.000000": 1_500_000}},
    }
    idle = {"iops": 0, "bw_bytes": 0, "clat_ns": {}}
    job = {"jobname": "j", "error": 0, "read": idle, "write": idle}
    job["write" if "write" in rw else "read"] = side
    return json.dumps({"fio version": "fio-3.33", "jobs": [job]})


def workload(name: str) -> blk.FioWorkload:
    (found,) = [w for w in blk.WORKLOADS if w.name == name]
    assert isinstance(found, blk.FioWorkload)
    return found


def test_fio_script_is_direct_libaio_for_the_settings() -> None:
    script = workload("read-1m-qd8").script(BenchSettings(runtime=1.5, ramp=0, size=64 * MiB))
    args = script.split()
    for expected in ("--direct=1", "--ioengine=libaio", "--rw=read", "--bs=1M", "--iodepth=8"):
        assert expected in args
    assert "--runtime=1500ms" in args and "--ramp_time=0ms" in args
    assert f"--size={64 * MiB}" in args and "--filename=/dev/vda" in args


def test_fio_parse_latency_workload() -> None:
    figures = workload("randread-4k-qd1").parse(fio_json(iops=1234.0))
    assert figures[VALUE] == figures["iops"] == 1234.0
    assert (figures["p50_us"], figures["p99_us"]) == (250.0, 1500.0)


def test_fio_parse_bandwidth_workload_reads_the_write_side() -> None:
    figures = workload("write-1m-qd8").parse(fio_json("write", iops=900, bw_bytes=900 * MiB))
    assert figures[VALUE] == figures["mib_s"] == 900.0
    assert "p50_us" not in figures


@pytest.mark.parametrize("output", ["", "fio: something went wrong", '{"jobs": []}'])
def test_fio_parse_rejects_bad_output(output: str) -> None:
    with pytest.raises(BenchError, match="randread-4k-qd32"):
        workload("randread-4k-qd32").parse(output)


def test_fio_parse_reports_a_job_error() -> None:
    data = json.loads(fio_json())
    data["jobs"][0]["error"] = 5
    with pytest.raises(BenchError, match="error 5"):
        workload("randread-4k-qd32").parse(json.dumps(data))


@dataclass(frozen=True)
class Echo(Workload):
    """A workload whose script prints a number (or fails)."""

    number: int = 0

    def script(self, settings: BenchSettings) -> str:
        return f"echo {self.number}" if self.number >= 0 else "echo broken; false"

    def parse(self, output: str) -> dict[str, float]:
        return {VALUE: float(output)}


def test_guest_script_output_splits_per_workload() -> None:
    workloads = [Echo("a", "A", "blk", "n", number=3), Echo("b", "B", "blk", "n", number=-1)]
    script = guest_script(workloads, BenchSettings())
    shell = shutil.which("busybox") or "/bin/sh"
    argv = [shell, "sh", "-c", script] if shell.endswith("busybox") else [shell, "-c", script]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    parts = split_output("boot noise\n" + done.stdout)
    assert parts == {"a": ("3\n", 0), "b": ("broken\n", 1)}


def test_rotation_spreads_the_order() -> None:
    targets = [Target(n, n, "blk", blk.builtin) for n in "abc"]
    orders = ["".join(t.name for t in rotation(targets, r)) for r in range(4)]
    assert orders == ["abc", "bca", "cab", "abc"]


def fabricated() -> BenchResult:
    targets = [
        Target("vdev", "vdev", "blk", blk.builtin),
        Target("qsd", "qemu-storage-daemon", "blk", blk.builtin, reference=True),
        Target("builtin", "built-in", "blk", blk.builtin),
    ]
    workloads = [workload("randread-4k-qd1"), workload("read-1m-qd8")]
    result = BenchResult(BenchSettings(repetitions=3), targets, workloads, accel="tcg")
    values = {
        ("vdev", "randread-4k-qd1"): [900, 1000, 5000],
        ("qsd", "randread-4k-qd1"): [2000, 1900, 2100],
        ("builtin", "randread-4k-qd1"): [2200, 2200, 2200],
        ("vdev", "read-1m-qd8"): [950, 1000, 990],
        ("qsd", "read-1m-qd8"): [1000, 1000, 1000],
        ("builtin", "read-1m-qd8"): [1100, 1200, 1300],
    }
    for key, runs in values.items():
        result.runs[key] = [{VALUE: v, "p50_us": v / 10, "p99_us": v / 5} for v in runs]
    return result


def test_medians_and_ratios() -> None:
    result = fabricated()
    assert result.median("vdev", "randread-4k-qd1") == 1000  # the outlier does not count
    assert result.median("vdev", "randread-4k-qd1", "p99_us") == 200
    assert result.ratio("vdev", "randread-4k-qd1") == pytest.approx(0.5)
    assert result.ratio("qsd", "read-1m-qd8") == 1.0
    assert result.median("vdev", "nothing") is None and result.ratio("vdev", "nothing") is None


def test_table_shows_medians_ratios_and_extras() -> None:
    text = report.table(fabricated())
    assert "1000 IOPS (0.50x)" in text and "2000 IOPS (1.00x)" in text
    assert "1200 MiB/s (1.20x)" in text
    latency = next(line for line in text.splitlines() if "latency p50" in line)
    assert latency.split()[-3:] == ["100", "200", "220"]


def test_reports_name_figures_and_ratios_not_goals(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    report.write_json(fabricated(), path)
    for text in (report.table(fabricated()), path.read_text()):
        lowered = text.lower()
        assert "goal" not in lowered and "met" not in lowered.split() and "missed" not in lowered


def test_json_report(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    report.write_json(fabricated(), path)
    data = json.loads(path.read_text())
    assert data["reference"] == "qsd"
    assert [t["name"] for t in data["targets"]] == ["vdev", "qsd", "builtin"]
    cell = data["results"]["vdev"]["randread-4k-qd1"]
    assert [run[VALUE] for run in cell["runs"]] == [900, 1000, 5000]
    assert cell["median"][VALUE] == 1000 and cell["ratio"] == pytest.approx(0.5)


def test_png_report_or_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bench.png"
    try:
        report.write_png(fabricated(), path)
    except BenchError as exc:  # matplotlib is not installed: the message says what to do
        assert "pip install matplotlib" in str(exc)
        assert not path.exists()
    else:
        assert path.read_bytes().startswith(b"\x89PNG")


def test_prepare_image_writes_every_block(tmp_path: Path) -> None:
    path, direct = blk.prepare_image(tmp_path, BenchSettings(size=6 * MiB))
    data = path.read_bytes()
    assert len(data) == 6 * MiB
    assert data.count(0) < len(data) // 100  # data everywhere, no holes of zeros
    assert direct == blk.supports_o_direct(path)


# --- daemons ---------------------------------------------------------------------------

FAKE_DAEMON = """
import pathlib, signal, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path(sys.argv[1]).unlink(), sys.exit(0)))
while True:
    time.sleep(1)
"""


async def test_daemon_waits_for_its_socket_and_stops_it(tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    async with core.daemon([sys.executable, "-c", FAKE_DAEMON, str(sock)], sock, tmp_path / "log"):
        assert sock.exists()
    assert not sock.exists()  # SIGTERM reached it


async def test_daemon_that_dies_early_is_an_error(tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    argv = [sys.executable, "-c", "print('cannot start'); raise SystemExit(3)"]
    with pytest.raises(BenchError, match="cannot start"):
        async with core.daemon(argv, sock, tmp_path / "log"):
            raise AssertionError("not reached")


async def test_builtin_target_renders_the_template(tmp_path: Path) -> None:
    context = BenchContext(tmp_path, BenchSettings(), tmp_path / "disk.img", direct=False)
    async with blk.builtin(context) as args:
        assert args == qemu.render_args(
            "builtin-blk", id="disk0", path=context.image, queues=1, direct=False
        )


# --- the command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--targets", "vdev,nope"], "--targets: unknown nope"),
        (["--workloads", "seq"], "--workloads: unknown seq"),
        (["--size", "1000K"], "--size"),
        (["--dir", "/nonexistent/dir"], "--dir"),
    ],
)
def test_bench_option_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.requires_qemu
async def test_vdev_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "vdev.cli", "bench", "--quick", "--json", str(out)]
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    table = done.stdout.decode()
    progress = [line for line in done.stderr.decode().splitlines() if "vdev bench: run" in line]
    runs = len(blk.TARGETS)
    assert [line.split(": ")[1] for line in progress] == [
        f"run {i}/{runs}" for i in range(1, runs + 1)
    ]
    assert progress[0].endswith("time left unknown until a run ends")
    assert all(line.endswith(" left") for line in progress[1:])
    assert progress[-1].count("; the last run; ") == 1
    data = json.loads(out.read_text())
    names = [t["name"] for t in data["targets"]]
    assert names == [t.name for t in blk.TARGETS]
    for target in names:
        for w in blk.WORKLOADS:
            assert data["results"][target][w.name]["median"][VALUE] > 0, (target, w.name)
            assert w.title in table
    assert data["results"]["qsd"]["read-1m-qd8"]["ratio"] == 1.0
