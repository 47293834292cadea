"""What each change point means for the gate: its size against the metric's floor, from the same rules as compare.

A change point's size is the median of its level after over the median of its level before (each level runs from
the previous change point to the next). It counts, as a regression or an improvement by the metric's direction,
only beyond the metric's floor:

* timings: ``history_threshold`` (1%) and the runs' own noise, the median over the runs before of each run's
  spread (compare's noise floor); compare's pairwise ``threshold`` (5% for s/step) is not applied: it absorbs the
  drift between two runs, which a history measures (the change point's t-test compares many runs before and after);
* peaks: compare's ``threshold`` (2%) and ``floor_gib`` (0.25 GiB; 0.5 for host RSS);
* drift: compare's ``max_drop`` (1 dB PSNR, 0.01 SSIM).

Timings of cases that ran on the CPU are reported, never gated, as in compare, and so is a metric the rules disable.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel

from flux2bench.compare.findings import CPU_TIMINGS
from flux2bench.history.detect import Shift
from flux2bench.history.series import Series

Decision = Literal["regression", "improvement", "within floor", "reported"]


@dataclass
class ChangePoint:
    run: int  # the position of the first run of the new level
    index: int  # the position of that run within its series
    before: float  # median of the level before
    after: float  # median of the level after
    change: float | None  # relative: after / before - 1 (None where before is 0)
    delta: float  # after - before, in the metric's unit
    pvalue: float  # Otava's t-test between the two levels
    decision: Decision
    floor: str  # the floor it was held against, in words
    runs_after: int  # runs at the new level so far (this one included)
    found_with: int | None = None  # runs at the new level when the history first found it (detection on each prefix)
    found_at: int | None = None  # the position of the run with which the history first found it

    @property
    def revealed_by(self) -> int:
        """The run that made the change point known: where it was first found, else where it starts."""
        return self.found_at or self.run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _levels(values: list[float], shifts: list[Shift]) -> list[tuple[int, int]]:
    bounds = [0, *(shift.index for shift in shifts), len(values)]
    return list(zip(bounds, bounds[1:]))


def _worse(series: Series, delta: float) -> bool:
    return delta > 0 if series.spec.lower_is_better else delta < 0


def _floor(series: Series, rule: BaseModel, before: list[int], change: float | None, delta: float) -> tuple[bool, str]:
    """Whether the change counts, and the floor it was held against."""
    kind = series.spec.kind
    if kind == "latency":
        noises = [series.points[i].noise for i in before if series.points[i].noise is not None]
        noise = statistics.median(noises) if noises else 0.0
        floor = max(rule.history_threshold, noise)
        why = f"±{floor:.1%} (history_threshold {rule.history_threshold:.1%}, the runs' own spread {noise:.1%})"
        return change is None or abs(change) > floor, why
    if kind == "memory":
        beyond = abs(delta) > rule.floor_gib and (change is None or abs(change) > rule.threshold)
        return beyond, f"±{rule.threshold:.0%} and ±{rule.floor_gib:g} GiB"
    return abs(delta) > rule.max_drop, f"±{rule.max_drop:g}{' ' + series.spec.unit if series.spec.unit else ''}"


def judge(series: Series, shifts: list[Shift], rule: BaseModel) -> list[ChangePoint]:
    """The change points of one series with their size and decision (``rule``: the metric's rule for the series'
    block, from the gate rules)."""
    values = series.values
    levels = _levels(values, shifts)
    judged = []
    for n, shift in enumerate(shifts):
        (start, end), (_, after_end) = levels[n], levels[n + 1]
        before = statistics.median(values[start:end])
        after = statistics.median(values[shift.index:after_end])
        delta = after - before
        change = after / before - 1 if before else None
        beyond, floor = _floor(series, rule, list(range(start, end)), change, delta)
        decision: Decision = ("regression" if _worse(series, delta) else "improvement") if beyond else "within floor"
        if series.cpu and series.spec.kind == "latency":
            decision, floor = "reported", f"{CPU_TIMINGS}: reported, not gated"
        elif not rule.enabled:
            decision, floor = "reported", "disabled by the gate rules: reported, not gated"
        judged.append(ChangePoint(series.runs[shift.index], shift.index, before, after, change, delta, shift.pvalue,
                                  decision, floor, len(values) - shift.index))
    return judged
