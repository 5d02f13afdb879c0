"""Measure what the driver-domain hop costs: `python tests/domain/measure_hop.py`.

Serves a file-backed disk in each service model — inprocess, driver+map, driver+copy —
and drives it from this process with vdev's Python front-end (standing in for the
guest; it shares the event loop with the device, as its test driver rings are only
safe within one process): 4 KiB reads at QD1 (latency),
4 KiB random reads at QD32 (IOPS), 1 MiB sequential reads and writes at QD8 (MiB/s).
Models alternate within each repetition; medians of the repetitions are printed,
with each driver model's ratio to inprocess. Not a test: timings are never asserted.

With ``--guest`` the same three models are rows of `vdev bench` instead: fio in a
real guest, inprocess as the reference row.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from vdev.config import DeviceSpec, build_device
from vdev.devices.blk import REQUEST_HEADER, RequestType
from vdev.domain.spec import DomainSpec
from vdev.testing.frontend import Frontend, FrontendQueue, serve_device

KiB, MiB = 1 << 10, 1 << 20
IMAGE_SIZE = 256 * MiB
MODELS = {
    "inprocess": DomainSpec(),
    "driver+map": DomainSpec("driver", "map"),
    "driver+copy": DomainSpec("driver", "copy"),
}
#: The same models as `vdev run` options (for the bench rows).
OPTIONS = {
    "inprocess": [],
    "driver+map": ["--domain", "driver", "--domain-memory", "map"],
    "driver+copy": ["--domain", "driver", "--domain-memory", "copy"],
}


def header(kind: RequestType, offset: int) -> bytes:
    return REQUEST_HEADER.pack(kind, 0, offset // 512)


async def run_depth(
    queue: FrontendQueue, depth: int, seconds: float, request: Callable[[int], None]
) -> tuple[int, float, list[float]]:
    """Keep `depth` requests in flight for `seconds`; (completed, elapsed, latencies)."""
    started: dict[int, float] = {}
    latencies: list[float] = []
    done = 0
    issued = 0
    begin = time.perf_counter()
    deadline = begin + seconds
    while True:
        now = time.perf_counter()
        while now < deadline and len(started) < depth:
            token = queue.ring.add(*request(issued))
            started[token] = time.perf_counter()
            issued += 1
        queue.kick()
        if not started:
            break
        for used in await queue.wait_used(1, timeout=30):
            latencies.append(time.perf_counter() - started.pop(used.token))
            if used.last_byte != 0:
                raise RuntimeError("request failed")
            done += 1
    return done, time.perf_counter() - begin, latencies


async def measure(socket: Path, seconds: float) -> dict[str, float]:
    results: dict[str, float] = {}
    async with Frontend.connect(socket, mem_size=64 * MiB) as fe:
        await fe.negotiate()
        queue = await fe.setup_queue(0, size=256)
        blocks = IMAGE_SIZE // (4 * KiB)

        def read4k(_: int) -> tuple[list[bytes], list[int]]:
            return [header(RequestType.IN, random.randrange(blocks) * 4 * KiB)], [4 * KiB, 1]

        def read1m(i: int) -> tuple[list[bytes], list[int]]:
            return [header(RequestType.IN, i * MiB % IMAGE_SIZE)], [MiB, 1]

        payload = os.urandom(MiB)

        def write1m(i: int) -> tuple[list[bytes], list[int]]:
            return [header(RequestType.OUT, i * MiB % IMAGE_SIZE), payload], [1]

        _, _, lat = await run_depth(queue, 1, seconds, read4k)
        results["qd1 4k read p50 us"] = statistics.median(lat) * 1e6
        results["qd1 4k read mean us"] = statistics.mean(lat) * 1e6
        done, elapsed, _ = await run_depth(queue, 32, seconds, read4k)
        results["qd32 4k randread kIOPS"] = done / elapsed / 1000
        done, elapsed, _ = await run_depth(queue, 8, seconds, read1m)
        results["qd8 1m seqread MiB/s"] = done / elapsed
        done, elapsed, _ = await run_depth(queue, 8, seconds, write1m)
        results["qd8 1m seqwrite MiB/s"] = done / elapsed
    return results


async def serve_and_measure(
    image: Path, socket: Path, domain: DomainSpec, seconds: float
) -> dict[str, float]:
    device = build_device(DeviceSpec("blk", socket, "file", {"path": str(image)}, domain=domain))
    try:
        async with serve_device(device, socket):
            return await measure(socket, seconds)
    finally:
        device.close()


async def main(seconds: float, reps: int) -> None:
    samples: dict[str, dict[str, list[float]]] = {m: {} for m in MODELS}
    with tempfile.TemporaryDirectory(prefix="vdev-hop-") as tmp:
        image = Path(tmp) / "disk.img"
        with image.open("wb") as f:
            f.write(os.urandom(IMAGE_SIZE))
        for rep in range(reps):
            for model, domain in MODELS.items():
                socket = Path(tmp) / f"{rep}-{model}.sock"
                for key, value in (await serve_and_measure(image, socket, domain, seconds)).items():
                    samples[model].setdefault(key, []).append(value)
                print(f"rep {rep + 1}/{reps} {model}: done", file=sys.stderr)
    keys = list(samples["inprocess"])
    print(f"{'':24}" + "".join(f"{m:>14}" for m in MODELS) + "   map/in  copy/in")
    for key in keys:
        medians = [statistics.median(samples[m][key]) for m in MODELS]
        ratios = "".join(f"{v / medians[0]:>9.2f}" for v in medians[1:])
        print(f"{key:24}" + "".join(f"{v:>14.1f}" for v in medians) + ratios)


async def in_guest(seconds: float, reps: int) -> None:
    """The models as `vdev bench` rows (fio in a guest), inprocess the reference."""
    from vdev.bench.blk import WORKLOADS, prepare_image, vdev_file
    from vdev.bench.core import BenchSettings, Target, run_bench
    from vdev.bench.report import table

    targets = [
        Target(name, f"vdev {name}", "blk", vdev_file(*extra), reference=not extra)
        for name, extra in OPTIONS.items()
    ]
    settings = BenchSettings(repetitions=reps, runtime=seconds, ramp=1.0, size=256 * MiB)
    result = await run_bench(targets, WORKLOADS, settings, prepare=prepare_image)
    print(table(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per workload")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--guest", action="store_true", help="fio in a guest (vdev bench)")
    args = parser.parse_args()
    trio.run(in_guest if args.guest else main, args.seconds, args.reps)
