"""The series of a history: per case key and gated metric, one value per run, read through the metric registry.

Points that are not comparable are never mixed: a series holds the runs of one GPU model and, unless
``allow_env_change``, one set of driver, CUDA and library versions (those ``compare`` requires to match); a
host-bound metric (loading, offload timings, CPU timings, host RSS) one host; host RSS one way of starting workers.
Runs that differ in any of these make a series of their own, which names what sets it apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flux2bench.history.runs import HistoryRun
from flux2bench.metrics import (BY_NAME, GATE_PHASE, MetricSpec, case_host_bound, drift_value, gated, peak, spread,
                                worker_start)
from flux2bench.results import CaseResult

GATED = tuple(spec for kind in ("latency", "memory", "drift") for spec in gated(kind))


@dataclass
class Point:
    """One run's value of a series; ``noise`` is the run's own spread of a timing (interquartile range of its
    samples over their median, as compare measures it), None for other metrics."""

    run: int  # the run's position in the history
    value: float
    noise: float | None = None


@dataclass
class Series:
    case_key: str
    case_label: str
    block: str
    metric: str
    apart: dict[str, str]  # what every run of the series shares: GPU model, versions, host
    cpu: bool  # timings of a case that ran on the CPU: reported, never gated (as compare does)
    points: list[Point] = field(default_factory=list)
    env_changes: list[tuple[int, str]] = field(default_factory=list)  # run position, versions that changed there

    @property
    def spec(self) -> MetricSpec:
        return BY_NAME[self.metric]

    @property
    def values(self) -> list[float]:
        return [point.value for point in self.points]

    @property
    def runs(self) -> list[int]:
        return [point.run for point in self.points]


def value_of(result: CaseResult, spec: MetricSpec) -> tuple[float | None, float | None]:
    """A gated metric's value in one record, and its within-run noise (timings only); None where not measured."""
    if not result.status.ran:
        return None, None
    if spec.kind == "latency":
        samples = spec.samples(result) if spec.samples else []
        return (spec.value(result), spread(samples) if len(samples) > 1 else None) if samples else (None, None)
    if spec.kind == "memory":
        return (peak(result, spec.name, GATE_PHASE).value if GATE_PHASE in result.memory else None), None
    metric = drift_value(result, spec.name)
    return (metric.value if metric else None), None


def apart(run: HistoryRun, result: CaseResult, spec: MetricSpec, allow_env_change: bool) -> dict[str, str]:
    """What a point shares with every other point of its series."""
    parts = {"GPU": str(result.setup.gpu or run.gpu or "no GPU")}
    if not allow_env_change:
        parts |= {name: str(version) for name, version in run.software.items()}
    if spec.host_bound or case_host_bound(result):
        parts["host"] = run.host
    if spec.kind == "memory" and spec.host_bound:
        parts["worker start"] = worker_start(result)
    return parts


def _version_changes(before: HistoryRun, now: HistoryRun) -> str:
    return "; ".join(f"{name} {before.software.get(name)} → {value}" for name, value in now.software.items()
                     if before.software.get(name) != value)


def build_series(runs: list[HistoryRun], allow_env_change: bool = False) -> list[Series]:
    """Every series of the history: in the newest run's case order, then the registry's metric order; the series
    holding a case's newest point first."""
    found: dict[tuple[str, str, tuple[tuple[str, str], ...]], Series] = {}
    last_run: dict[tuple[str, str, tuple[tuple[str, str], ...]], HistoryRun] = {}
    for run in runs:
        for key, result in run.results.items():
            for spec in GATED:
                value, noise = value_of(result, spec)
                if value is None:
                    continue
                parts = apart(run, result, spec, allow_env_change)
                ident = (key, spec.name, tuple(parts.items()))
                series = found.setdefault(ident, Series(key, result.label, result.block, spec.name, parts,
                                                        result.setup.device == "cpu"))
                if ident in last_run and (changed := _version_changes(last_run[ident], run)):
                    series.env_changes.append((run.position, changed))
                series.points.append(Point(run.position, value, noise))
                last_run[ident] = run
    case_order = {key: i for i, key in enumerate(runs[-1].results)} if runs else {}
    metric_order = {spec.name: i for i, spec in enumerate(GATED)}
    return sorted(found.values(), key=lambda s: (case_order.get(s.case_key, len(case_order)), s.case_key,
                                                 metric_order[s.metric], -s.runs[-1]))


def differences(series: Series, primary: Series) -> str:
    """What sets ``series`` apart from ``primary`` (the series of the same case and metric holding its newest run)."""
    names = dict.fromkeys([*primary.apart, *series.apart])
    return "; ".join(f"{name} {series.apart.get(name, '—')} (not {primary.apart.get(name, '—')})" for name in names
                     if series.apart.get(name) != primary.apart.get(name))


def as_dict(series: Series) -> dict[str, Any]:
    return {"case_key": series.case_key, "case_label": series.case_label, "block": series.block,
            "metric": series.metric, "unit": series.spec.unit, "apart": series.apart, "cpu": series.cpu,
            "points": [vars(point) for point in series.points],
            "env_changes": [{"run": run, "changed": text} for run, text in series.env_changes]}
