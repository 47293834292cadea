"""The runner measures drift against the bf16 baseline: it runs a missing baseline once, reuses it, and
turns a broken threshold into drift_fail. One real tiny run (three workers) serves every test."""

from __future__ import annotations

import pytest

from flux2bench.drift import SYNTHETIC_LABEL
from flux2bench.metrics import peak, s_per_image
from flux2bench.runner import Runner, resume_run, start_run

pytestmark = pytest.mark.slow  # every test runs the real tiny pipeline in workers

SCENARIO = """
    defaults:
      model: tiny
      device: cpu
      resolution: 64
      steps: 2
      repeats: 1
      warmup: 0
      prompts: a red fox
      timeout_s: 300
    blocks:
      math-attention:
        attention: _native_math
        drift: {min_psnr: 10}
      impossible-threshold:
        attention: _native_math
        drift: {min_psnr: 100}  # the PSNR of identical images: these are not
      no-baseline-wanted:
        attention: _native_math
        drift_baseline: existing
"""


@pytest.fixture(scope="module")
def run(run_scenario):
    return run_scenario(SCENARIO, "drift-runner")


def test_a_missing_baseline_is_run_once_and_stored_under_its_own_block(run):
    baselines = [r for r in run.store.results() if r.block.endswith(".baseline")]
    assert [b.block for b in baselines] == ["math-attention.baseline"]
    baseline = baselines[0]
    assert (baseline.status, baseline.case.settings["attention"], baseline.case.settings["offload"]) == ("ok", "sdpa", "none")
    assert baseline.outputs and baseline.drift is None


def test_drift_compares_against_that_baseline_with_every_metric_and_the_synthetic_label(run):
    drift = run["math-attention"].drift
    baseline_key = next(r.key for r in run.store.results() if r.block == "math-attention.baseline")
    assert drift.baseline_key == baseline_key
    assert drift.label == SYNTHETIC_LABEL
    assert 0.9 < drift.metrics["latent_cosine"].value <= 1.0
    assert drift.metrics["psnr"].value > 10
    assert drift.metrics["ms_ssim"].value is None and "too small" in drift.metrics["ms_ssim"].reason
    assert run["math-attention"].status == "ok" and drift.failed == []


def test_the_baseline_is_reused_by_later_cases_of_the_same_identity(run):
    assert run["impossible-threshold"].drift.baseline_key == run["math-attention"].drift.baseline_key


def test_a_broken_threshold_gives_drift_fail_and_keeps_the_measurements(run):
    result = run["impossible-threshold"]
    assert result.drift.metrics["psnr"].value < 100  # math attention's images differ from SDPA's: min_psnr 100 breaks
    assert result.status == "drift_fail"
    assert result.drift.failed == ["min_psnr"]
    assert "min_psnr" in result.reason
    assert s_per_image(result) is not None and peak(result, "host_rss_peak_gib", "inference").value is not None


def test_drift_baseline_existing_uses_a_baseline_already_in_the_run(run):
    assert run["no-baseline-wanted"].drift.baseline_key == run["math-attention"].drift.baseline_key


def test_resume_runs_nothing_again_and_keeps_the_baseline(run, tmp_path):
    before = {r.key: r.to_json() for r in run.store.results()}
    store, cases = resume_run(run.copy_to(tmp_path / "run"))  # a resume writes run.json: not into the shared run
    assert Runner(store).run(cases) == []
    assert {r.key: r.to_json() for r in store.results()} == before



@pytest.fixture
def split_run(write_scenario, tmp_path):
    """A run directory made in parts, as `run --block` makes one: two cases awaiting one baseline, nothing run."""
    scenario = write_scenario("""
        defaults: {model: tiny, device: cpu, resolution: 64, steps: 2, repeats: 1, warmup: 0, prompts: a red fox}
        blocks:
          math-attention:
            attention: _native_math
            drift_baseline: existing
          math-attention-moved:
            attention: _native_math
            drift_baseline: existing
          bf16-sdpa: {}
    """)
    return start_run(scenario, run_dir=tmp_path / "run")


def test_a_record_without_a_baseline_gets_its_drift_once_a_resumed_run_measures_one(split_run):
    store, (case, _, baseline) = split_run
    Runner(store).run([case])  # what `run --block math-attention` leaves: measured, nothing to compare with
    assert store.results()[0].drift.baseline_key is None

    Runner(store).run([case, baseline])  # the resumed run measures the baseline
    drift = {r.key: r for r in store.results()}[case.key].drift
    assert drift.baseline_key == baseline.key and drift.metrics["latent_cosine"].value > 0.9


def test_a_baseline_measured_for_another_block_gives_the_waiting_case_its_drift(split_run):
    store, (case, moved, baseline) = split_run
    Runner(store).run([case, moved])  # `run --block math-attention --block math-attention-moved`: no baseline yet
    moved_output = {r.key: r for r in store.results()}[moved.key].outputs[0]
    (store.root / moved_output.image).unlink()  # e.g. its images were not brought back from another machine

    Runner(store).run([baseline])  # `run --resume RUN --block bf16-sdpa`
    records = {r.key: r for r in store.results()}
    assert records[case.key].drift.baseline_key == baseline.key
    assert records[case.key].drift.metrics["psnr"].value > 10
    assert records[moved.key].drift.baseline_key is None  # nothing to compare: it keeps waiting, nothing raised


class _MachineGoesAway:
    """An executor whose machine is taken back once it has run its cases: the run stops before its end."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, cases, supervisor, sink):
        self.inner.execute(cases, supervisor, sink)
        raise KeyboardInterrupt


def test_a_run_stopped_before_its_end_keeps_the_drift_of_cases_whose_baseline_had_run(split_run):
    from flux2bench.executors import ExecutorOptions, make_executor

    store, (case, _, baseline) = split_run
    with pytest.raises(KeyboardInterrupt):
        Runner(store, executor=_MachineGoesAway(make_executor(ExecutorOptions()))).run([case, baseline])
    drift = {r.key: r for r in store.results()}[case.key].drift
    assert drift.baseline_key == baseline.key and drift.metrics["psnr"].value > 10
