"""The bench chart's layout: no two texts overlap (computed from matplotlib's layout)."""

from __future__ import annotations

import itertools

import pytest

# matplotlib comes with vdev's [bench] extra, which scripts/setup.sh installs: its
# absence is a broken setup, not a reason to skip.
from matplotlib.text import Text

from vdev.bench import blk, net, report
from vdev.bench.core import VALUE, BenchResult, BenchSettings, Target, Workload


def result_for(targets: list[Target], workloads: list[Workload]) -> BenchResult:
    """Three runs per cell, figures of very different sizes (as real runs have)."""
    result = BenchResult(BenchSettings(repetitions=3), targets, workloads, accel="tcg")
    for i, target in enumerate(targets):
        for j, workload in enumerate(workloads):
            base = 1000.0 * (i + 1) * (j + 1) ** 2
            result.runs[(target.name, workload.name)] = [{VALUE: base * f} for f in (0.8, 1, 1.3)]
    return result


def texts(result: BenchResult) -> list[tuple[str, object]]:
    """Every drawn, non-empty text of the chart with its box in display coordinates."""
    fig = report.figure(result)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        found = []
        for text in fig.findobj(Text):
            if not text.get_visible() or not text.get_text().strip():
                continue
            box = text.get_window_extent(renderer)
            if box.width and box.height and fig.bbox.overlaps(box):  # drawn on the figure
                found.append((text.get_text(), box))
        return found
    finally:
        report.pyplot().close(fig)


@pytest.mark.parametrize(
    ("targets", "workloads"),
    [
        (blk.TARGETS, blk.WORKLOADS),  # vdev, qsd, builtin, driver-map, driver-copy
        (net.GUEST_TARGETS, net.GUEST_WORKLOADS),
        (net.PMD_TARGETS, net.PMD_WORKLOADS),
    ],
    ids=["blk", "net", "pmd"],
)
def test_no_two_labels_overlap(targets: list[Target], workloads: list[Workload]) -> None:
    found = texts(result_for(list(targets), list(workloads)))
    names = {text for text, _ in found}
    assert {t.name for t in targets} <= names  # every target is labelled
    assert {f"{w.title} ({w.unit})" for w in workloads} <= names
    assert sum(text.endswith("x") for text, _ in found) == len(targets) * len(workloads)
    overlapping = [
        (a, b)
        for (a, box_a), (b, box_b) in itertools.combinations(found, 2)
        if box_a.overlaps(box_b)  # type: ignore[attr-defined]
    ]
    assert not overlapping
