"""Change points in synthetic series: a step is found where it starts, a ramp is cut into rising levels, one slow
run in the middle is not a change, noise alone rarely is, and a series too short has none looked for."""

from __future__ import annotations

import numpy as np
import pytest

from flux2bench.history import MIN_POINTS, change_points, found_after

NOISE = 0.004  # same-code reruns of scenarios/ci.yaml: s/step medians within 1.0% of each other on one H100


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261207)


def series(rng: np.random.Generator, n: int, noise: float = NOISE, level: float = 0.088) -> np.ndarray:
    return level * np.exp(rng.normal(0.0, noise, n))


def indices(values) -> list[int]:
    return [shift.index for shift in change_points(list(values))]


def test_a_step_is_found_at_the_run_where_it_starts(rng):
    values = series(rng, 20)
    values[10:] *= 1.03
    [shift] = change_points(list(values))
    assert shift.index == 10 and shift.pvalue <= 0.001


def test_two_steps_of_3_percent_are_both_found_each_within_a_few_runs_of_its_start(rng):
    values = series(rng, 20)
    values[10:] *= 1.03
    values[15:] *= 1.03
    assert indices(values) == [10, 15]
    first_found = found_after(list(values))
    assert set(first_found) == {10, 15}
    assert all(index < k <= index + 4 for index, k in first_found.items()), first_found


def test_a_ramp_is_cut_into_levels_that_rise(rng):
    values = series(rng, 20) * np.linspace(1.0, 1.10, 20)
    found = indices(values)
    assert found
    bounds = [0, *found, 20]
    medians = [np.median(values[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert medians == sorted(medians)


def test_one_slow_run_in_the_middle_is_not_a_change_point(rng):
    values = series(rng, 20)
    values[8] *= 1.20
    assert indices(values) == []


def test_one_slow_newest_run_cannot_be_told_from_a_step_and_is_a_change_point_at_that_run(rng):
    values = series(rng, 12)
    values[-1] *= 1.20
    assert indices(values) == [11]


def test_noise_alone_rarely_makes_a_change_point(rng):
    with_any = sum(bool(change_points(list(series(rng, n, noise=0.01)))) for n in (12, 20) for _ in range(100))
    assert with_any <= 10  # of 200 series at 1% noise; Otava's t-test is applied to the split found to fit best


def test_constant_series_have_no_change_point_and_a_step_between_constants_is_one():
    assert indices([9.8] * 12) == []
    assert indices([9.8] * 6 + [10.3] * 6) == [6]


@pytest.mark.parametrize("n", range(MIN_POINTS))
def test_a_series_shorter_than_the_method_needs_has_no_change_point_looked_for(n):
    assert change_points([1.0] * (n - 1) + [2.0] if n else []) == []
    assert found_after([1.0] * n) == {}


def test_the_significance_level_decides_what_is_a_change_point(rng):
    values = series(rng, 12, noise=0.01)
    values[6:] *= 1.02
    assert len(change_points(list(values), max_pvalue=0.5)) >= len(change_points(list(values), max_pvalue=1e-9))
    assert change_points(list(values), max_pvalue=1e-9) == []
