"""Benchmark results as a text table, a JSON document and a bar chart."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

from vdev.bench.core import VALUE, BenchError, BenchResult, Target, Workload

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


def write_png(result: BenchResult, path: Path) -> None:
    """One bar chart per workload: each target's median, whiskers from min to max."""
    plt = pyplot()
    workloads = result.workloads
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.2 * len(workloads), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        targets = [t for t in result.targets if t.kind == workload.kind]
        names, medians, low, high = [], [], [], []
        for t in targets:
            values = [r[VALUE] for r in result.runs.get((t.name, workload.name), [])]
            median = result.median(t.name, workload.name) or 0.0
            names.append(t.name)
            medians.append(median)
            low.append(median - min(values, default=median))
            high.append(max(values, default=median) - median)
        bars = ax.bar(names, medians, yerr=[low, high], capsize=4, color="#4c72b0")
        for bar, t in zip(bars, targets, strict=True):
            if t.reference:
                bar.set_color("#999999")
            ratio = result.ratio(t.name, workload.name)
            if ratio is not None:
                ax.annotate(
                    f"{ratio:.2f}x",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set_title(workload.title, fontsize=9)
        ax.set_ylabel(workload.unit)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"vdev bench (median of {result.settings.repetitions}; ratio to reference)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
