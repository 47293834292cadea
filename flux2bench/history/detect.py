"""Change points in one series of values, one per run, found by Apache Otava.

Otava's default method (Fleming et al., "Hunter: Using Change Point Detection to Hunt for Performance Regressions",
ICPE 2023): e-divisive means (Matteson and James) proposes the split that most separates the series, in windows of
``WINDOW`` runs, and a two-sided Student's t-test between the runs before and after it keeps the splits with
p <= ``max_pvalue``; splits are then merged back, weakest first, until every one is significant. Deterministic (no
permutation test), so the same history always gives the same change points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flux2bench.history.runs import HistoryError

MAX_PVALUE = 0.001  # Otava's default significance level
WINDOW = 50  # Otava's default window, in runs
# The fewest runs in a series for which change points are looked for: a change at the newest run then has the level
# of at least 3 runs before it, so that the t-test estimates the noise from the series rather than from 1 or 2 runs.
MIN_POINTS = 4
INSTALL = "pip install 'flux2bench[history]'"


@dataclass(frozen=True)
class Shift:
    """A change point as the detector reports it: the index of the first value of the new level, and the p-value of
    the t-test between the level before and the level after."""

    index: int
    pvalue: float


def _otava():  # type: ignore[no-untyped-def]
    try:
        from otava.analysis import compute_change_points
    except ImportError as exc:
        raise HistoryError(f"change points are found by Apache Otava, which is not installed ({exc}): {INSTALL}") \
            from None
    return compute_change_points


def change_points(values: Sequence[float], max_pvalue: float = MAX_PVALUE) -> list[Shift]:
    """The change points of ``values`` (oldest first), in order; none for fewer than MIN_POINTS values."""
    if len(values) < MIN_POINTS:
        return []
    found, _weak = _otava()(list(values), window_len=WINDOW, max_pvalue=max_pvalue)
    return [Shift(int(point.index), float(point.stats.pvalue)) for point in found]


def found_after(values: Sequence[float], max_pvalue: float = MAX_PVALUE) -> dict[int, int]:
    """For each change point of the whole series (by index), the fewest values with which it is found at that index:
    detection rerun on the first k values, for each k, as the history grew."""
    final = {shift.index for shift in change_points(values, max_pvalue)}
    first: dict[int, int] = {}
    for k in range(MIN_POINTS, len(values) + 1):
        for shift in change_points(values[:k], max_pvalue):
            if shift.index in final:
                first.setdefault(shift.index, k)
    return dict(sorted(first.items()))
