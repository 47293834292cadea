"""What a change point means for the gate: its size (medians before and after) against the metric's floor from
compare's rules, in the metric's direction; CPU timings and disabled metrics are reported, never gated."""

from __future__ import annotations

import numpy as np
import pytest

from flux2bench.compare import GateRules
from flux2bench.history import change_points
from flux2bench.history.gate import judge
from flux2bench.history.series import Point, Series


def make_series(metric: str, values, noise: float | None = None, cpu: bool = False) -> Series:
    points = [Point(run, float(value), noise) for run, value in enumerate(values, 1)]
    return Series("main-0a1b2c3d4e5f", "case", "main", metric, {"GPU": "NVIDIA H100 80GB HBM3"}, cpu, points)


def judged(series: Series, rules: GateRules | None = None):
    rule = getattr((rules or GateRules()).for_block(series.block), series.metric)
    return judge(series, change_points(series.values), rule)


def steady(n: int = 12, level: float = 0.088, noise: float = 0.002, seed: int = 1) -> np.ndarray:
    return level * np.exp(np.random.default_rng(seed).normal(0.0, noise, n))


def stepped(factor: float, at: int = 8, n: int = 12, **kwargs) -> np.ndarray:
    values = steady(n, **kwargs)
    values[at:] *= factor
    return values


def test_a_3_percent_slower_step_is_a_regression_with_its_medians_before_and_after():
    values = stepped(1.03)
    [point] = judged(make_series("s_per_step", values, noise=0.003))
    assert point.decision == "regression" and point.run == 9 and point.index == 8
    assert point.before == pytest.approx(np.median(values[:8])) and point.after == pytest.approx(np.median(values[8:]))
    assert point.change == pytest.approx(point.after / point.before - 1) and 0.02 < point.change < 0.04
    assert point.runs_after == 4 and point.pvalue <= 0.001
    assert "history_threshold 1.0%" in point.floor


def test_a_faster_step_is_an_improvement():
    [point] = judged(make_series("s_per_step", stepped(0.95)))
    assert point.decision == "improvement"


def test_a_timing_change_within_the_runs_own_spread_is_within_the_floor():
    [point] = judged(make_series("s_per_step", stepped(1.03), noise=0.05))
    assert point.decision == "within floor" and "spread 5.0%" in point.floor


def test_the_rules_set_the_timing_floor_per_block():
    rules = GateRules.model_validate({"blocks": {"main": {"s_per_step": {"history_threshold": 0.05}}}})
    [point] = judged(make_series("s_per_step", stepped(1.03)), rules)
    assert point.decision == "within floor"


@pytest.mark.parametrize("step_gib, decision", [(0.1, "within floor"), (1.0, "regression"), (-1.0, "improvement")])
def test_a_peak_counts_beyond_compares_2_percent_and_quarter_gib(step_gib, decision):
    values = [12.9] * 8 + [12.9 + step_gib] * 4
    [point] = judged(make_series("gpu_device_peak_gib", values))
    assert point.decision == decision and point.delta == pytest.approx(step_gib)


@pytest.mark.parametrize("drop_db, decision", [(2.0, "regression"), (0.5, "within floor"), (-2.0, "improvement")])
def test_psnr_regresses_when_it_drops_beyond_compares_max_drop(drop_db, decision):
    values = stepped(1.0, noise=0.001, level=30.0) - np.array([0.0] * 8 + [drop_db] * 4)
    [point] = judged(make_series("psnr", values))
    assert point.decision == decision


def test_cpu_timings_are_reported_and_never_gated():
    [point] = judged(make_series("s_per_step", stepped(1.5), cpu=True))
    assert point.decision == "reported" and "CPU" in point.floor


def test_a_metric_the_rules_disable_is_reported():
    rules = GateRules.model_validate({"defaults": {"s_per_step": {"enabled": False}}})
    [point] = judged(make_series("s_per_step", stepped(1.5)), rules)
    assert point.decision == "reported"
