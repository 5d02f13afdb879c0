"""Benchmark results as a text table, a JSON document and a bar chart."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from vdev.bench.core import VALUE, BenchError, BenchResult, Target, Workload

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _cell(result: BenchResult, target: Target, workload: Workload) -> str:
    value = result.median(target.name, workload.name)
    if value is None:
        return "-"
    ratio = result.ratio(target.name, workload.name)
    text = f"{_number(value)} {workload.unit}"
    return text if ratio is None else f"{text} ({ratio:.2f}x)"


def table(result: BenchResult) -> str:
    """Medians per workload (rows) and target (columns), ratios to the reference."""
    s = result.settings
    reference = result.reference
    header = [
        f"vdev bench: median of {s.repetitions} run(s); fio in a {s.cpus}-vCPU "
        f"{result.accel.upper()} guest, {s.size >> 20} MiB image, {s.runtime:g} s per "
        f"workload; {result.seconds:.0f} s in all",
    ]
    if reference is not None:
        header.append(f"ratios: each figure over {reference.title}'s")
    rows = [["workload", *(t.title for t in result.targets)]]
    for workload in result.workloads:
        targets = [t for t in result.targets if t.kind == workload.kind]
        rows.append([workload.title, *(_cell(result, t, workload) for t in targets)])
        for key, label in workload.extras:
            medians = [result.median(t.name, workload.name, key) for t in targets]
            rows.append([f"  {label}", *(_number(m) for m in medians)])
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(rows[0]))]
    lines = [*header, ""]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    return "\n".join(lines)


def to_json(result: BenchResult) -> dict[str, Any]:
    """Everything: settings, every run's figures, medians and ratios."""
    s = result.settings
    results: dict[str, dict[str, Any]] = {}
    for target in result.targets:
        for workload in result.workloads_of(target):
            runs = result.runs.get((target.name, workload.name), [])
            keys = sorted({k for run in runs for k in run})
            results.setdefault(target.name, {})[workload.name] = {
                "runs": runs,
                "median": {k: result.median(target.name, workload.name, k) for k in keys},
                "ratio": result.ratio(target.name, workload.name),
            }
    reference = result.reference
    return {
        "settings": {
            "repetitions": s.repetitions,
            "runtime_s": s.runtime,
            "ramp_s": s.ramp,
            "image_bytes": s.size,
            "guest_cpus": s.cpus,
            "guest_mem": s.mem,
            "accel": result.accel,
            "qsd_aio": s.qsd_aio,
        },
        "seconds": result.seconds,
        "reference": reference.name if reference else None,
        "targets": [{"name": t.name, "title": t.title, "kind": t.kind} for t in result.targets],
        "workloads": [
            {"name": w.name, "title": w.title, "kind": w.kind, "unit": w.unit}
            for w in result.workloads
        ],
        "results": results,
    }


def write_json(result: BenchResult, path: Path) -> None:
    path.write_text(json.dumps(to_json(result), indent=2) + "\n")


def pyplot() -> ModuleType:
    """matplotlib's pyplot (off-screen), imported on first use; `BenchError` if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--png needs matplotlib: pip install matplotlib") from None
    return plt


def figure(result: BenchResult) -> Figure:
    """The chart: one row of horizontal bars per workload, a bar per target.

    Each bar is a target's median, whiskers from its min to max run, the ratio to the
    reference at its end. Target names sit one per line on the vertical axis, so long
    names never run into each other.
    """
    plt = pyplot()
    rows = [[t for t in result.targets if t.kind == w.kind] for w in result.workloads]
    heights = [0.6 + 0.3 * len(targets) for targets in rows]
    fig, axes = plt.subplots(
        len(rows),
        1,
        figsize=(7.0, sum(heights) + 0.8),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for ax, workload, targets in zip(axes[:, 0], result.workloads, rows, strict=True):
        medians, low, high = [], [], []
        for t in targets:
            values = [r[VALUE] for r in result.runs.get((t.name, workload.name), [])]
            median = result.median(t.name, workload.name) or 0.0
            medians.append(median)
            low.append(median - min(values, default=median))
            high.append(max(values, default=median) - median)
        places = list(range(len(targets)))
        colors = ["#999999" if t.reference else "#4c72b0" for t in targets]
        ax.barh(places, medians, xerr=[low, high], capsize=3, color=colors, height=0.6)
        ax.set_yticks(places, [t.name for t in targets], fontsize=8)
        ax.invert_yaxis()  # the first target on top
        ends = [m + h for m, h in zip(medians, high, strict=True)]
        right = max(ends, default=0.0) or 1.0
        for place, t, end in zip(places, targets, ends, strict=True):
            ratio = result.ratio(t.name, workload.name)
            if ratio is not None:
                ax.text(end + right * 0.02, place, f"{ratio:.2f}x", va="center", fontsize=8)
        ax.set_xlim(0, right * 1.18)  # room for the ratios
        ax.set_title(f"{workload.title} ({workload.unit})", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"vdev bench: median of {result.settings.repetitions}, ratio to the reference",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def write_png(result: BenchResult, path: Path) -> None:
    """`figure` as a PNG file."""
    plt = pyplot()
    fig = figure(result)
    fig.savefig(path, dpi=120)
    plt.close(fig)
