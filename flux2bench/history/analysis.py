"""A history analysed: its runs, each series with its change points, and the gate's decision on the newest runs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from flux2bench.compare import GateRules
from flux2bench.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from flux2bench.history.detect import MAX_PVALUE, MIN_POINTS, change_points, found_after
from flux2bench.history.gate import ChangePoint, judge
from flux2bench.history.runs import (HistoryError, HistoryRun, Order, Skipped, cannot_judge, order_warning,
                                     read_history)
from flux2bench.history.series import Series, as_dict, build_series, differences



@dataclass
class Analysed:
    """A series with its change points, or why none were looked for."""

    series: Series
    change_points: list[ChangePoint] = field(default_factory=list)
    not_enough: str | None = None  # "not enough history: ..." when the series is too short
    apart_from: str | None = None  # what sets it apart from the series of its case and metric holding the newest run


@dataclass
class History:
    runs: list[HistoryRun]
    skipped: list[Skipped]
    analysed: list[Analysed]
    newest: int  # how many of the newest runs the gate looks at
    max_pvalue: float
    order: Order
    allow_env_change: bool
    unjudged: str | None = None  # why the gate cannot judge the newest runs (runs.cannot_judge)
    warnings: list[str] = field(default_factory=list)

    @property
    def newest_runs(self) -> list[HistoryRun]:
        return self.runs[-self.newest:]

    def found_with_newest(self, point: ChangePoint) -> bool:
        """Whether the newest runs start the change point or make it significant (a small step is often found one
        or two runs after it starts)."""
        return point.revealed_by > len(self.runs) - self.newest

    def gates(self, point: ChangePoint) -> bool:
        """Whether the change point fails the gate: a regression beyond the floor found with the newest runs."""
        return point.decision == "regression" and self.found_with_newest(point)

    def failures(self) -> list[tuple[Analysed, ChangePoint]]:
        return [(a, p) for a in self.analysed for p in a.change_points if self.gates(p)]

    def short_of_history(self) -> list[Analysed]:
        """Series holding a newest run that are too short to look for change points in (the gate cannot judge)."""
        return [a for a in self.analysed if a.not_enough and a.series.runs[-1] > len(self.runs) - self.newest]

    @property
    def exit_code(self) -> int:
        """The gate's: 2 when it cannot judge the newest runs (even beside a regression of those it read), 1 on a
        regression, else 0."""
        if self.unjudged:
            return EXIT_BAD_INPUT
        return EXIT_FAILED if self.failures() else EXIT_OK

    @property
    def decision(self) -> str:
        return "cannot judge" if self.unjudged else "regression" if self.failures() else "pass"

    def to_json(self) -> str:
        data = {
            "decision": self.decision, "exit_code": self.exit_code, "newest": self.newest,
            "method": {"detector": "Apache Otava e-divisive means, t-test", "max_pvalue": self.max_pvalue,
                       "min_points": MIN_POINTS, "order": self.order, "allow_env_change": self.allow_env_change},
            "runs": [{"position": r.position, "path": str(r.path), "run_id": r.run_id, "started": r.started,
                      "scenario": r.scenario, "commit": r.commit, "label": r.label, "gpu": r.gpu, "host": r.host,
                      "software": r.software} for r in self.runs],
            "cannot_judge": self.unjudged, "warnings": self.warnings,
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "series": [{**as_dict(a.series), "not_enough_history": a.not_enough, "apart_from": a.apart_from,
                        "change_points": [{**p.to_dict(), "gates": self.gates(p)}
                                          for p in a.change_points]} for a in self.analysed],
        }
        return json.dumps(_finite(data), indent=1)


def _finite(value: Any) -> Any:
    """JSON without NaN or Infinity (a p-value of a t-test between two constant levels can be NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def analyse(series: list[Series], rules: GateRules, max_pvalue: float) -> list[Analysed]:
    primary: dict[tuple[str, str], Series] = {}
    analysed = []
    for s in series:
        first = primary.setdefault((s.case_key, s.metric), s)
        entry = Analysed(s, apart_from=differences(s, first) if first is not s else None)
        if len(s.points) < MIN_POINTS:
            entry.not_enough = (f"not enough history: {len(s.points)} run{'s' if len(s.points) != 1 else ''}, "
                                f"change points need at least {MIN_POINTS}")
        else:
            rule = getattr(rules.for_block(s.block), s.metric)
            entry.change_points = judge(s, change_points(s.values, max_pvalue), rule)
            first_found = found_after(s.values, max_pvalue) if entry.change_points else {}
            for point in entry.change_points:
                point.found_with = first_found[point.index] - point.index
                point.found_at = s.runs[first_found[point.index] - 1]
        analysed.append(entry)
    return analysed


def build_history(paths: Sequence[str | Path], order: Order = "time", rules: GateRules | None = None,
                  allow_env_change: bool = False, newest: int = 1, max_pvalue: float = MAX_PVALUE) -> History:
    """Read the run directories (or folders of them), build every series and find its change points; raises
    HistoryError when no run is usable or an option is out of range."""
    if newest < 1:
        raise HistoryError(f"newest must be at least 1, not {newest}")
    if not 0 < max_pvalue < 1:
        raise HistoryError(f"max_pvalue must lie between 0 and 1, not {max_pvalue}")
    runs, skipped = read_history([Path(p) for p in paths], order)
    if not runs:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3]) or "none given"
        raise HistoryError(f"no usable run directory ({len(skipped)} skipped: {reasons})")
    rules = rules or GateRules()
    blocks = {r.block for run in runs for r in run.results.values()}
    if unknown := sorted(set(rules.blocks) - blocks):
        raise HistoryError(f"the gate rules override blocks that no run has: {', '.join(unknown)}; the runs' blocks "
                           f"are {', '.join(sorted(blocks))}")
    series = build_series(runs, allow_env_change)
    warnings = [text] if order == "given" and (text := order_warning(runs)) else []
    return History(runs, skipped, analyse(series, rules, max_pvalue), min(newest, len(runs)), max_pvalue, order,
                   allow_env_change, cannot_judge(runs, skipped, newest), warnings)

