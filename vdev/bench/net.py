"""Network benchmarks: DPDK's testpmd against vdev's echo port, and guests on a TAP.

Two families, both in the runner's target x workload shape (`vdev.bench.core`):

- ``pmd`` (no guest): dpdk-testpmd is the front-end (virtio-user) of a back-end that
  echoes every frame: vdev's `echo` backend in a ``vdev run`` daemon, or the C reference,
  DPDK's own vhost-user port in a second testpmd forwarding in ``macswap`` mode. testpmd
  offers frames far faster than any back-end here takes them, so the rates measure the
  back-end's own per-frame cost. Workloads: one way (``txonly``: the front-end never
  reads the echoes, the back-end drops them) and round trip (``io`` with a few bursts in
  flight), 64- and 1500-byte frames; frames/s and Gbit/s from testpmd's port counters.
  The back-end and testpmd's forwarding core are pinned to different CPUs.
- ``net`` (in a guest): the guest's NIC is a TAP whose host end sits in a network
  namespace made for the run, served by vdev's `tap` backend or by QEMU's built-in
  virtio-net (builtin-net-tap.args). A peer in the namespace (`HostPeer`) times the TCP
  streams the guest sends with busybox nc and serves the ones it fetches with busybox
  wget. Workloads: TCP guest to host and host to guest (MiB/s), and ping round trips
  per second. The guest's TCG CPU is part of what these measure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TextIO

import trio
from pyroute2 import IPRoute

from vdev import netsetup
from vdev.bench.core import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    VALUE,
    BenchContext,
    BenchError,
    BenchResult,
    BenchSettings,
    Target,
    Workload,
    daemon,
    run_label,
    schedule,
    start_progress,
)
from vdev.qemu import render_args

log = logging.getLogger(__name__)

TESTPMD = "dpdk-testpmd"
#: Debian 12 packages: testpmd, and its virtio-user and vhost-user ports.
DPDK_PACKAGES = "dpdk-dev librte-net-virtio23 librte-net-vhost23"
DPDK_RUNTIME_DIR = Path("/var/run/dpdk")
PROMPT = b"testpmd> "
#: Frames in flight for round trips: `start tx_first N` sends N bursts of 32.
RR_BURSTS = 4
#: How long a back-end gets to create its socket, and to exit after SIGTERM.
COMMAND_TIMEOUT = 30.0
MiB = 1 << 20

_STATS = re.compile(
    r"RX-packets:\s*(\d+)\s+RX-missed:\s*(\d+)\s+RX-bytes:\s*(\d+).*?"
    r"TX-packets:\s*(\d+)\s+TX-errors:\s*(\d+)\s+TX-bytes:\s*(\d+)",
    re.DOTALL,
)


class TestpmdError(BenchError):
    """dpdk-testpmd is missing, exited, or did not answer."""


# --- dpdk-testpmd as a front-end ---------------------------------------------------------


def find_testpmd() -> str:
    path = shutil.which(TESTPMD)
    if path is None:
        raise TestpmdError(f"{TESTPMD} not found: apt-get install {DPDK_PACKAGES}")
    return path


@dataclass(frozen=True)
class PortStats:
    """testpmd's counters of one port (`show port stats`)."""

    rx_packets: int
    rx_missed: int
    rx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int


class Testpmd:
    """A dpdk-testpmd process in interactive mode, driven line by line over a pipe."""

    def __init__(self, process: trio.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.output = bytearray()

    async def _read_prompt(self, timeout: float) -> str:
        """What testpmd prints up to its next prompt (output the forwarding cores print
        meanwhile, `set verbose`, may follow the prompt)."""
        start = len(self.output)
        assert self.process.stdout is not None
        with trio.move_on_after(timeout):
            while (end := self.output.rfind(PROMPT, start)) < 0:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    raise TestpmdError(f"{self.name} exited:\n{self.tail()}")
                self.output += chunk
            return self.output[start:end].decode(errors="replace")
        raise TestpmdError(f"{self.name} did not answer within {timeout} s:\n{self.tail()}")

    async def send(self, line: str) -> None:
        """Type one command without waiting for its prompt (with `set verbose`, the
        forwarding cores' output can interleave with the prompt and garble it)."""
        assert self.process.stdin is not None
        log.debug("%s> %s", self.name, line)
        try:
            await self.process.stdin.send_all(line.encode() + b"\n")
        except trio.BrokenResourceError:
            raise TestpmdError(f"{self.name} exited:\n{self.tail()}") from None

    async def command(self, line: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run one testpmd command; its output."""
        await self.send(line)
        return await self._read_prompt(timeout)

    async def port_stats(self, port: int = 0) -> PortStats:
        text = await self.command(f"show port stats {port}")
        # A command typed with `send` (no wait) answers first: its prompt comes before.
        for _ in range(3):
            match = _STATS.search(text)
            if match is not None:
                return PortStats(*map(int, match.groups()))
            text = await self._read_prompt(COMMAND_TIMEOUT)
        raise TestpmdError(f"{self.name}: no port statistics in:\n{text}")

    def tail(self, chars: int = 3000) -> str:
        return self.output[-chars:].decode(errors="replace")


def testpmd_argv(
    vdev: str,
    *,
    prefix: str,
    lcores: str,
    queues: int = 1,
    forward_mode: str = "io",
    frame_size: int = 64,
    extra: Sequence[str] = (),
) -> list[str]:
    """A testpmd command line: no hugepages, no PCI, one virtual port `vdev`.

    Under ``stdbuf -o0``: through a pipe testpmd's printf output would otherwise lag
    behind its prompt, which it writes unbuffered.
    """
    return [
        "stdbuf", "-o0", find_testpmd(),
        "-l", lcores, "--no-huge", "-m", "256", "--no-pci", "--no-shconf",
        f"--file-prefix={prefix}", "--log-level=lib.eal:error", f"--vdev={vdev}",
        "--", "-i", "--total-num-mbufs=8192", f"--rxq={queues}", f"--txq={queues}",
        f"--forward-mode={forward_mode}", f"--txpkts={frame_size}", *extra,
    ]  # fmt: skip


@asynccontextmanager
async def run_testpmd(argv: Sequence[str], name: str = TESTPMD) -> AsyncIterator[Testpmd]:
    """testpmd running `argv` (see `testpmd_argv`), ready at its prompt; quit at the end."""
    prefix = next((a.split("=", 1)[1] for a in argv if a.startswith("--file-prefix=")), None)
    process = await trio.lowlevel.open_process(
        list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    pmd = Testpmd(process, name)
    try:
        await pmd._read_prompt(START_TIMEOUT)
        yield pmd
        with trio.move_on_after(STOP_TIMEOUT), contextlib.suppress(TestpmdError):
            await pmd.command("quit")  # an error here: it exited already
    finally:
        with trio.CancelScope(shield=True):
            await _reap(process, pmd)
            if prefix:
                shutil.rmtree(DPDK_RUNTIME_DIR / prefix, ignore_errors=True)


async def _reap(process: trio.Process, pmd: Testpmd) -> None:
    """Wait for testpmd (draining its output) and kill it if it lingers."""
    assert process.stdout is not None
    with trio.move_on_after(STOP_TIMEOUT):
        while chunk := await process.stdout.receive_some():
            pmd.output += chunk
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
    if process.returncode not in (0, None):
        log.warning("%s exited with status %s", pmd.name, process.returncode)


def virtio_user(sock: Path, *, queues: int = 1, packed: bool = False, mrg: bool = True) -> str:
    """testpmd's --vdev value for a virtio-user port on vhost-user socket `sock`."""
    return (
        f"net_virtio_user0,path={sock},queues={queues},packed_vq={int(packed)},mrg_rxbuf={int(mrg)}"
    )


# --- back-ends for testpmd ---------------------------------------------------------------


#: The CPU the back-end runs on; testpmd's forwarding core takes the other one.
BACKEND_CPU, FRONTEND_CPU = 0, 1


def vdev_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vdev.cli", "-q", *args]


@asynccontextmanager
async def vdev_echo(ctx: BenchContext) -> AsyncIterator[list[str]]:
    """vdev's echo backend in a ``vdev run net`` daemon; yields its socket."""
    sock = ctx.workdir / "vdev.sock"
    argv = vdev_cli("run", "net", "--socket", str(sock), "--backend", "echo")
    async with daemon(argv, sock, ctx.workdir / "vdev.log", cpu=BACKEND_CPU):
        yield [str(sock)]


@asynccontextmanager
async def dpdk_vhost(ctx: BenchContext) -> AsyncIterator[list[str]]:
    """DPDK's vhost-user port in a testpmd that sends every frame back (``macswap``)."""
    sock = ctx.workdir / "vhost.sock"
    argv = testpmd_argv(
        f"net_vhost0,iface={sock},queues=1",
        prefix=f"vdevbench-vhost-{os.getpid()}",
        lcores=f"{FRONTEND_CPU},{BACKEND_CPU}",  # main lcore first: forwarding on BACKEND_CPU
        forward_mode="macswap",
    )
    async with run_testpmd(argv, "dpdk vhost-user testpmd") as pmd:
        await pmd.command("start")
        with trio.fail_after(START_TIMEOUT):
            while not sock.exists():
                await trio.sleep(0.02)
        yield [str(sock)]


@dataclass(frozen=True)
class PmdWorkload(Workload):
    """testpmd (virtio-user) against the target's socket: frames per second."""

    mode: str = "txonly"
    frame_size: int = 64
    unit: str = "kframes/s"
    extras: tuple[tuple[str, str], ...] = (("gbit_s", "Gbit/s"),)

    async def measure(self, sock: Path, settings: BenchSettings) -> dict[str, float]:
        round_trip = self.mode == "io"
        argv = testpmd_argv(
            virtio_user(sock),
            prefix=f"vdevbench-{os.getpid()}",
            lcores=f"{BACKEND_CPU},{FRONTEND_CPU}",
            forward_mode=self.mode,
            frame_size=self.frame_size,
        )
        async with run_testpmd(argv) as pmd:
            await pmd.command(f"start tx_first {RR_BURSTS}" if round_trip else "start")
            await trio.sleep(settings.ramp)
            await pmd.command("clear port stats all")
            started = trio.current_time()
            await trio.sleep(settings.runtime)
            stats = await pmd.port_stats()
            elapsed = trio.current_time() - started
            await pmd.command("stop")
        frames = stats.rx_packets if round_trip else stats.tx_packets
        if not frames:
            raise BenchError(f"{self.name}: no frames moved:\n{pmd.tail()}")
        rate = frames / elapsed
        return {VALUE: rate / 1000, "gbit_s": rate * self.frame_size * 8 / 1e9}


PMD_WORKLOADS: list[PmdWorkload] = [
    PmdWorkload(f"pmd-{tag}-{size}", f"{title}, {size} B", "pmd", mode=mode, frame_size=size)
    for tag, title, mode in (
        ("tx", "testpmd -> back-end", "txonly"),
        ("rr", "round trip via echo", "io"),
    )
    for size in (64, 1500)
]

PMD_TARGETS: list[Target] = [
    Target("vdev-echo", "vdev echo backend", "pmd", vdev_echo),
    Target("dpdk-vhost", "DPDK vhost-user + macswap", "pmd", dpdk_vhost, reference=True),
]


def _workdir(settings: BenchSettings) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="vdev-bench-net-", dir=settings.workdir)


async def run_pmd_bench(
    targets: Sequence[Target],
    workloads: Sequence[PmdWorkload],
    settings: BenchSettings,
    progress: TextIO | None = None,
) -> BenchResult:
    """Every ``pmd`` workload against every ``pmd`` target, `settings.repetitions` times
    (a fresh back-end per target and repetition, a fresh testpmd per workload); each run
    is reported on `progress` as it starts."""
    result = BenchResult(settings, list(targets), list(workloads), accel="none")
    find_testpmd()
    started = time.monotonic()
    with _workdir(settings) as tmp:
        root = Path(tmp)
        runs = schedule(targets, workloads, settings.repetitions)
        reporter = start_progress(runs, progress)
        for run in runs:
            target = run.target
            workdir = root / f"{target.name}-{run.repetition}"
            workdir.mkdir()
            measured = []
            with reporter.run(run_label(run, settings)):
                async with target.setup(BenchContext(workdir, settings, workdir, False)) as args:
                    for workload in run.workloads:
                        assert isinstance(workload, PmdWorkload)
                        figures = await workload.measure(Path(args[0]), settings)
                        measured.append((workload, figures))
            for workload, figures in measured:
                result.runs.setdefault((target.name, workload.name), []).append(figures)
                log.info(
                    "%s, %s: %.1f %s", target.name, workload.name, figures[VALUE], workload.unit
                )
    result.seconds = time.monotonic() - started
    return result


# --- in a guest: TCP and ping through a TAP, vdev vs QEMU's built-in virtio-net ----------

HOST_IP, GUEST_IP = "10.69.0.1", "10.69.0.2"
PREFIX_LEN = 24
PEER_PORT, SINK_PORT = 8080, 8081
#: Bytes per TCP transfer, and transfers per second of `BenchSettings.runtime`.
CHUNK = 16 * MiB
_CHUNK_LIMIT = 64  # transfers per workload, whatever the runtime
_HEAD_END = b"\r\n\r\n"
_SINK_RESULT = re.compile(r"^sink (\d+) ([0-9.]+)$", re.MULTILINE)
_UPTIMES = re.compile(r"^uptime ([0-9.]+) ([0-9.]+)$", re.MULTILINE)
_PING = re.compile(r"(\d+) packets received.*?= [0-9.]+/([0-9.]+)/", re.DOTALL)

#: Guest commands run before each workload: address eth0 (once) and wait for the host.
_GUEST_NET = f"""
ip link set eth0 up
ip addr add {GUEST_IP}/{PREFIX_LEN} dev eth0 2> /dev/null || true
n=0
until ping -c 1 -W 1 {HOST_IP} > /dev/null 2>&1; do
    n=$((n + 1)); [ $n -lt 120 ] || {{ echo "no answer from {HOST_IP}"; exit 1; }}
done
"""


def _transfers(settings: BenchSettings) -> int:
    return max(1, min(_CHUNK_LIMIT, round(settings.runtime)))


async def _read_request(conn: trio.socket.SocketType) -> str:
    """The request line of an HTTP/1.0 request (headers read and ignored)."""
    data = b""
    while _HEAD_END not in data:
        chunk = await conn.recv(65536)
        if not chunk:
            raise ConnectionError("request cut short")
        data += chunk
    return data.split(b"\r\n", 1)[0].decode("latin-1")


async def _send_all(conn: trio.socket.SocketType, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[await conn.send(view) :]


def _listener_in(ns: str, port: int) -> trio.socket.SocketType:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(8)
        return sock

    return trio.socket.from_stdlib_socket(netsetup.in_netns(ns, make))


class HostPeer:
    """The guest's TCP peer, listening in the run's network namespace.

    Port `SINK_PORT` reads each stream to its end and records how many bytes came and
    the seconds from the first to the last. Port `PEER_PORT` speaks just enough HTTP/1.0
    for busybox wget: ``GET /bytes/N`` sends N zero bytes; ``GET /sinks/K`` waits for K
    recorded streams and answers one "sink <bytes> <seconds>" line for each.
    """

    def __init__(self) -> None:
        self._sinks: list[tuple[int, float]] = []
        self._changed = trio.Event()

    async def serve(
        self, ns: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with _listener_in(ns, SINK_PORT) as sinks, _listener_in(ns, PEER_PORT) as http:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept, sinks, self._sink)
                nursery.start_soon(self._accept, http, self._http)
                task_status.started()

    @staticmethod
    async def _accept(
        listener: trio.socket.SocketType,
        handler: Callable[[trio.socket.SocketType], Awaitable[None]],
    ) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(handler, conn)

    async def _sink(self, conn: trio.socket.SocketType) -> None:
        with conn:
            received, started = 0, 0.0
            while chunk := await conn.recv(1 << 20):
                if not received:
                    started = time.perf_counter()
                received += len(chunk)
            self._sinks.append((received, time.perf_counter() - started))
            self._changed.set()
            self._changed = trio.Event()

    async def _http(self, conn: trio.socket.SocketType) -> None:
        with conn:
            try:
                method, path, _ = (await _read_request(conn)).split(" ", 2)
                kind, _, number = path.strip("/").partition("/")
                count = int(number)
                if method != "GET" or kind not in ("bytes", "sinks"):
                    raise ValueError(f"unexpected request {method} {path}")
                if kind == "sinks":
                    with trio.move_on_after(STOP_TIMEOUT):
                        while len(self._sinks) < count:
                            await self._changed.wait()
                    body = "".join(f"sink {n} {t:.6f}\n" for n, t in self._sinks).encode()
                    self._sinks.clear()
                    await _send_all(conn, b"HTTP/1.0 200 OK\r\n\r\n" + body)
                    return
                head = f"HTTP/1.0 200 OK\r\nContent-Length: {count}\r\n\r\n"
                await _send_all(conn, head.encode())
                zeros = memoryview(bytes(1 << 20))
                for offset in range(0, count, len(zeros)):
                    await _send_all(conn, zeros[: count - offset])
            except (OSError, ValueError) as exc:
                log.warning("host peer: %s", exc)


@asynccontextmanager
async def host_side(ctx: BenchContext) -> AsyncIterator[str]:
    """A network namespace for the run with the guest's TCP peer listening in it."""
    if os.geteuid() != 0:
        raise BenchError("the TAP benchmarks need root (TAP devices, network namespaces)")
    ns = f"vdevbench-{os.getpid()}-{ctx.workdir.name}"[:60]
    await trio.to_thread.run_sync(netsetup.create_netns, ns)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(HostPeer().serve, ns)
            yield ns
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(netsetup.remove_netns, ns)


def _tap_name(ctx: BenchContext) -> str:
    return f"vdb{os.getpid() % 10_000}{abs(hash(ctx.workdir.name)) % 10_000}"


@asynccontextmanager
async def vdev_tap(ctx: BenchContext) -> AsyncIterator[list[str]]:
    """vdev's tap backend (a ``vdev run net`` daemon), the TAP in the run's namespace."""
    async with host_side(ctx) as ns:
        sock, tap = ctx.workdir / "vdev.sock", _tap_name(ctx)
        argv = vdev_cli("run", "net", "--socket", str(sock), "--backend", "tap", "--tap", tap)
        argv += ["--netns", ns, "-o", f"address={HOST_IP}/{PREFIX_LEN}"]
        async with daemon(argv, sock, ctx.workdir / "vdev.log"):
            yield render_args("vdev-net", id="net0", socket=sock, queues=1, mq=False)


def _move_tap(tap: str, ns: str) -> None:
    """Move TAP `tap` into namespace `ns` (its open fds stay valid), address it, up."""
    netsetup.with_iproute(None, lambda ipr: netsetup.move_link(ipr, tap, ns))

    def configure(ipr: IPRoute) -> None:
        netsetup.add_address(ipr, tap, f"{HOST_IP}/{PREFIX_LEN}")
        netsetup.set_up(ipr, tap)

    netsetup.with_iproute(ns, configure)


async def _hand_over(tap: str, ns: str) -> None:
    """Once QEMU has opened `tap`, move it into namespace `ns`."""
    opened = partial(netsetup.with_iproute, None, lambda ipr: netsetup.has_carrier(ipr, tap))
    while not await trio.to_thread.run_sync(opened):
        await trio.sleep(0.05)
    await trio.to_thread.run_sync(_move_tap, tap, ns)
    log.debug("TAP %s handed over to namespace %s", tap, ns)


@asynccontextmanager
async def builtin_tap(ctx: BenchContext) -> AsyncIterator[list[str]]:
    """QEMU's own virtio-net on a TAP (builtin-net-tap.args, no vhost-net).

    QEMU opens TAPs by name in its own namespace: the TAP is made here, persistent and
    unconfigured, and moved into the run's namespace as soon as QEMU has it open.
    """
    async with host_side(ctx) as ns:
        tap = _tap_name(ctx)
        await trio.to_thread.run_sync(
            netsetup.with_iproute, None, lambda ipr: netsetup.create_tap(ipr, tap)
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_hand_over, tap, ns)
                yield render_args("builtin-net-tap", id="net0", tap=tap, queues=1, mq=False)
                nursery.cancel_scope.cancel()
        finally:
            await trio.to_thread.run_sync(
                netsetup.with_iproute, None, lambda ipr: netsetup.remove_link(ipr, tap)
            )


@dataclass(frozen=True)
class GuestNetWorkload(Workload):
    """A measurement made in the guest against the host peer (see `host_side`)."""

    def script(self, settings: BenchSettings) -> str:
        return _GUEST_NET + self.body(settings)

    def body(self, settings: BenchSettings) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class TcpSend(GuestNetWorkload):
    """Guest to host: streams of `CHUNK` bytes (busybox nc), timed by the host peer."""

    unit: str = "MiB/s"

    def body(self, settings: BenchSettings) -> str:
        return f"""
dd if=/dev/zero of=/tmp/blob bs=1M count={CHUNK // MiB} 2> /dev/null
for i in $(seq {_transfers(settings)}); do
    nc {HOST_IP} {SINK_PORT} < /tmp/blob
done
rm /tmp/blob
wget -q -O - http://{HOST_IP}:{PEER_PORT}/sinks/{_transfers(settings)}
"""

    def parse(self, output: str) -> dict[str, float]:
        runs = [(int(b), float(s)) for b, s in _SINK_RESULT.findall(output)]
        if not runs or any(b != CHUNK for b, _ in runs):
            raise BenchError(f"{self.name}: unexpected output:\n{output[-2000:]}")
        return {VALUE: sum(b for b, _ in runs) / sum(s for _, s in runs) / MiB}


@dataclass(frozen=True)
class TcpReceive(GuestNetWorkload):
    """Host to guest: one download, timed in the guest (/proc/uptime, 10 ms ticks)."""

    unit: str = "MiB/s"

    def body(self, settings: BenchSettings) -> str:
        size = _transfers(settings) * CHUNK
        return f"""
t0=$(cut -d' ' -f1 /proc/uptime)
wget -q -O /dev/null http://{HOST_IP}:{PEER_PORT}/bytes/{size}
echo "uptime $t0 $(cut -d' ' -f1 /proc/uptime)"
echo "bytes {size}"
"""

    def parse(self, output: str) -> dict[str, float]:
        times = _UPTIMES.search(output)
        size = re.search(r"^bytes (\d+)$", output, re.MULTILINE)
        if times is None or size is None:
            raise BenchError(f"{self.name}: unexpected output:\n{output[-2000:]}")
        elapsed = max(float(times.group(2)) - float(times.group(1)), 0.01)
        return {VALUE: int(size.group(1)) / elapsed / MiB}


@dataclass(frozen=True)
class PingRate(GuestNetWorkload):
    """Back-to-back pings (``ping -A``: the next one as soon as the reply is in)."""

    unit: str = "round trips/s"
    extras: tuple[tuple[str, str], ...] = (("rtt_us", "average round trip (us)"),)

    def body(self, settings: BenchSettings) -> str:
        seconds = max(1, round(settings.runtime))
        return f"ping -A -q -w {seconds} {HOST_IP} || true\necho seconds {seconds}\n"

    def parse(self, output: str) -> dict[str, float]:
        match = _PING.search(output)
        seconds = re.search(r"^seconds (\d+)$", output, re.MULTILINE)
        if match is None or seconds is None or not int(match.group(1)):
            raise BenchError(f"{self.name}: unexpected output:\n{output[-2000:]}")
        return {
            VALUE: int(match.group(1)) / int(seconds.group(1)),
            "rtt_us": float(match.group(2)) * 1000,
        }


GUEST_WORKLOADS: list[Workload] = [
    TcpSend("tcp-send", "TCP guest -> host", "net"),
    TcpReceive("tcp-receive", "TCP host -> guest", "net"),
    PingRate("ping", "ping round trips", "net"),
]

GUEST_TARGETS: list[Target] = [
    Target("vdev-tap", "vdev tap backend", "net", vdev_tap),
    Target("builtin-tap", "QEMU built-in virtio-net + TAP", "net", builtin_tap, reference=True),
]


def no_image(directory: Path, settings: BenchSettings) -> tuple[Path, bool]:
    """`run_bench`'s `prepare` for net workloads: they need no disk image."""
    return directory, False
