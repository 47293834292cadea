"""The regression gate: pairs of runs with known differences, and the verdict each must get."""

from __future__ import annotations

import json
import re
import statistics

import numpy as np
import pytest

from flux2bench.compare.verdict import rounded
from flux2bench.results import WallSplit
from flux2bench.trackers.environment import host_differences
from flux2bench.compare import CompareError, GateRules, Verdict, compare, compare_runs, load_rules
from records import environment
from runs import make_case, make_run, named, noisy, run_in_memory, with_changes

CV = 0.01  # realistic run-to-run noise of a diffusion step on a dedicated GPU
REPEATS = 5
# The baseline scenario: case name -> (true seconds per image, inference peaks in GiB, drift vs bf16).
CASES = {
    "base-0a1b2c3d4e5f": (1.0, dict(gpu_allocated_peak_gib=18.0, gpu_reserved_peak_gib=20.0,
                                    gpu_device_peak_gib=21.0, host_rss_peak_gib=6.0), None),
    "quant-1b2c3d4e5f6a": (0.8, dict(gpu_allocated_peak_gib=10.0, gpu_reserved_peak_gib=12.0,
                                     gpu_device_peak_gib=13.0, host_rss_peak_gib=7.0), dict(psnr=32.0, ssim=0.95)),
    "offload-2c3d4e5f6a7b": (3.0, dict(gpu_allocated_peak_gib=4.0, gpu_reserved_peak_gib=5.0,
                                       gpu_device_peak_gib=6.0, host_rss_peak_gib=30.0), None),
}
BASE, QUANT, OFFLOAD = CASES


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20250601)


@pytest.fixture
def draw(rng):
    """One timed run of a scenario case: fresh noise around its true latency, with the given changes."""

    def draw_case(key, *, slowdown=1.0, memory=None, drift=None, repeats=REPEATS, cv=CV, **changes):
        seconds, peaks, drifts = CASES[key]
        return make_case(key, image_s=noisy(rng, seconds * slowdown, repeats, cv),
                         memory={**peaks, **(memory or {})}, drift={**(drifts or {}), **(drift or {})}, **changes)

    return draw_case


@pytest.fixture
def baseline(draw):
    return [draw(key) for key in CASES]


@pytest.fixture
def gate(tmp_path, baseline):
    """Write the baseline run and a current run of ``current`` cases, and compare them from disk."""

    def run_gate(current, *, baseline_cases=None, current_env=None, current_keys=None, rules=None, **options) -> Verdict:
        pair = tmp_path / f"pair{len(list(tmp_path.iterdir()))}"
        base = make_run(pair, "baseline", baseline_cases or baseline)
        cur = make_run(pair, "current", current, environment=current_env, case_keys=current_keys)
        return compare_runs(base, cur, rules=rules, **options)

    return run_gate


def finding(verdict: Verdict, name: str, metric: str):
    return next(f for f in named(verdict.cases, name).findings if f.metric == metric)


# ---------------------------------------------------------------------- host-bound metrics
OTHER_HOST = dict(cpu="Intel(R) Xeon(R) Platinum 8480+")


def offloaded(image_s: list[float], rss: float = 30.0, load_s: float | None = None):
    record = make_case(OFFLOAD, image_s=image_s, setting={"offload": "model"}, memory={"host_rss_peak_gib": rss})
    if load_s is not None:
        record.latency.load_s = load_s
    return record


def test_on_another_host_host_bound_metrics_are_reported_not_gated(gate):
    baseline = [offloaded([3.0, 3.01, 3.02, 2.99, 3.0], rss=30.0, load_s=10.0)]
    current = [offloaded([4.0, 4.01, 4.02, 3.99, 4.0], rss=40.0, load_s=30.0)]
    verdict = gate(current, baseline_cases=baseline, current_env=environment(**OTHER_HOST))
    for metric in ("s_per_image", "s_per_step", "load_s", "host_rss_peak_gib"):
        reported = finding(verdict, OFFLOAD, metric)
        assert reported.decision == "reported" and "hosts differ" in reported.test
        assert reported.baseline is not None and reported.current is not None
    assert verdict.exit_code == 0 and "Other host" in verdict.markdown()


def test_host_ram_of_workers_started_differently_is_reported_not_gated(gate):
    def started(how, rss):
        record = offloaded([3.0, 3.01, 3.02, 2.99, 3.0], rss=rss)
        record.wall_split = WallSplit("test", worker_start=how)
        return record

    verdict = gate([started("fork-server", 25.0)], baseline_cases=[started(None, 30.0)])
    reported = finding(verdict, OFFLOAD, "host_rss_peak_gib")
    assert reported.decision == "reported" and "fresh against fork-server" in reported.test
    assert finding(verdict, OFFLOAD, "s_per_image").decision == "pass"
    gated = gate([started("fork-server", 40.0)], baseline_cases=[started("fork-server", 30.0)])
    assert finding(gated, OFFLOAD, "host_rss_peak_gib").decision == "regression"


def test_gpu_bound_timings_are_gated_on_another_host(gate, draw):
    verdict = gate([draw(BASE, slowdown=1.10), draw(QUANT), draw(OFFLOAD)], current_env=environment(**OTHER_HOST))
    assert finding(verdict, BASE, "s_per_image").decision == "regression"
    assert finding(verdict, BASE, "load_s").decision == "reported"


@pytest.mark.parametrize("slowdown, decision", [(1.10, "pass"), (1.30, "regression")])
def test_on_the_same_host_host_bound_timings_have_their_own_threshold(gate, slowdown, decision):
    times = [3.0, 3.01, 3.02, 2.99, 3.0]
    verdict = gate([offloaded([t * slowdown for t in times])], baseline_cases=[offloaded(times)])
    result = finding(verdict, OFFLOAD, "s_per_image")
    assert result.decision == decision and "15%" in result.test


def test_timings_of_a_cpu_case_are_reported_not_gated(gate):
    on_cpu = [make_case(BASE, image_s=[1.0, 1.01, 1.02, 0.99, 1.0], device="cpu")]
    slower = [make_case(BASE, image_s=[3.0, 3.01, 3.02, 2.99, 3.0], device="cpu")]
    verdict = gate(slower, baseline_cases=on_cpu)
    for metric in ("s_per_image", "s_per_step"):
        reported = finding(verdict, BASE, metric)
        assert reported.decision == "reported" and "ran on the CPU" in reported.test
    assert verdict.exit_code == 0


def test_a_cpu_case_is_host_bound():
    from flux2bench.metrics import case_host_bound

    assert case_host_bound(make_case(BASE, image_s=[1.0], device="cpu"))
    assert not case_host_bound(make_case(BASE, image_s=[1.0], device="cuda:0"))
    assert case_host_bound(offloaded([1.0]))


def test_a_measured_bandwidth_is_never_the_hosts_identity():
    from flux2bench.trackers.environment import host_differences

    # 4.8 and 8.2 GiB/s pageable: two runs measured on one H100 host
    slow = environment(host_to_device={"pageable_gib_s": 4.8, "pinned_gib_s": 20.0})
    fast = environment(host_to_device={"pageable_gib_s": 8.2, "pinned_gib_s": 50.0})
    assert host_differences(fast, slow) == []


@pytest.mark.parametrize("change, difference", [
    (dict(cpu_count=32), "CPU count 16 vs 32"), (dict(machine_id="b" * 32), "machine id"),
    (dict(host_ram_gib=251.0), "host RAM"),
    (dict(gpus=[{"name": "NVIDIA H100 80GB HBM3", "pcie_max_link": "gen4 x16"}]), "GPUs and PCIe links")])
def test_a_host_differs_by_what_is_stable(change, difference):
    from flux2bench.trackers.environment import host_differences

    base = environment(machine_id="a" * 32, gpus=[{"name": "NVIDIA H100 80GB HBM3", "pcie_max_link": "gen5 x16"}])
    [found] = host_differences(base, {**base, **change})
    assert found.startswith(difference)


def test_what_one_run_did_not_record_is_said_in_words_not_as_none():
    from flux2bench.compare import _differences

    base = environment(machine_id="a" * 32)
    assert host_differences({**base, "machine_id": None}, base) == [f"machine id not recorded vs {'a' * 32}"]
    assert _differences({"driver": "580.159.04"}, {"driver": None}, ("driver",)) == ["driver 580.159.04 → none"]


def test_a_host_label_given_to_both_runs_decides_alone():
    from flux2bench.trackers.environment import host_differences

    one, other = environment(host_label="ci-h100-1"), environment(host_label="ci-h100-1", cpu_count=8)
    assert host_differences(one, other) == []
    assert host_differences(one, {**one, "host_label": "ci-h100-2"}) == ["host label ci-h100-1 vs ci-h100-2"]


def test_a_run_compared_with_itself_is_never_on_another_host(tmp_path):
    from flux2bench.compare import compare_runs

    bare = {key: value for key, value in environment().items() if key not in ("cpu", "host_ram_gib")}
    run = make_run(tmp_path, "run", [offloaded([3.0, 3.01, 2.99])], environment=bare)
    verdict = compare_runs(run, run)
    assert verdict.host_differences == [] and "Other host" not in verdict.markdown()


# --------------------------------------------------------------------------------- latency
def test_a_rerun_of_the_same_setup_passes(gate, draw):
    verdict = gate([draw(key) for key in CASES])
    assert verdict.exit_code == 0
    assert verdict.decision == "pass"
    assert [c.decision for c in verdict.cases] == ["pass"] * len(CASES)


def test_a_real_10_percent_slowdown_is_a_latency_regression(gate, draw):
    verdict = gate([draw(BASE, slowdown=1.10), draw(QUANT), draw(OFFLOAD)])
    assert verdict.exit_code == 1
    for metric in ("s_per_image", "s_per_step"):
        slow = finding(verdict, BASE, metric)
        assert slow.decision == "regression"
        assert slow.change == pytest.approx(0.10, abs=0.03)
        assert "Mann-Whitney" in slow.test
    assert finding(verdict, QUANT, "s_per_image").decision == "pass"


def test_cases_are_matched_by_key_not_by_order(gate, draw):
    current = [draw(OFFLOAD), draw(QUANT, slowdown=1.10), draw(BASE)]
    verdict = gate(current, current_keys=[record.key for record in current])
    assert [c.label for c in verdict.cases] == [f"case {name}" for name in CASES]  # in the baseline's order
    assert {name: named(verdict.cases, name).decision for name in CASES} == {BASE: "pass", QUANT: "regression",
                                                                            OFFLOAD: "pass"}


def test_a_single_slow_outlier_does_not_fail_the_gate(gate, draw, baseline):
    current = draw(BASE)
    current.latency.stages["image"][2] *= 2.0
    current.latency.steps[2] = [s * 2.0 for s in current.latency.steps[2]]
    before, after = baseline[0].latency.stages["image"], current.latency.stages["image"]
    assert statistics.mean(after) > 1.15 * statistics.mean(before)  # a mean-based gate would fail
    verdict = gate([current, draw(QUANT), draw(OFFLOAD)])
    assert verdict.exit_code == 0
    assert finding(verdict, BASE, "s_per_image").decision == "pass"


def test_a_significant_slowdown_below_the_threshold_passes(gate, draw):
    tight = [draw(key, cv=0.001) for key in CASES]
    verdict = gate([draw(key, slowdown=1.03, cv=0.001) for key in CASES], baseline_cases=tight)
    assert verdict.exit_code == 0
    assert "within ±5%" in finding(verdict, BASE, "s_per_step").test
    assert "within ±10%" in finding(verdict, BASE, "s_per_image").test  # its host-side share drifts more


@pytest.mark.parametrize("baseline_s, current_s, decision, why", [
    ([1.00, 1.01], [1.10, 1.12], "inconclusive", "too few samples for Mann-Whitney at alpha=0.1 (needs 3 per side)"),
    ([1.00, 1.01], [1.60, 1.70], "regression", "every sample differs by more than 50%, far beyond noise"),
    ([1.00], [0.40], "large_improvement", "far beyond noise"),
])
def test_too_few_samples_are_inconclusive_unless_far_beyond_noise(gate, baseline_s, current_s, decision, why):
    verdict = gate([make_case(BASE, image_s=current_s)], baseline_cases=[make_case(BASE, image_s=baseline_s)])
    result = finding(verdict, BASE, "s_per_image")
    assert result.decision == decision
    assert why in result.test


def test_a_change_within_the_baselines_own_spread_passes(gate):
    verdict = gate([make_case(BASE, image_s=[1.10, 1.40])], baseline_cases=[make_case(BASE, image_s=[1.00, 1.30])])
    result = finding(verdict, BASE, "s_per_image")  # medians 9% apart, the baseline's own spread 13%
    assert result.decision == "pass" and "within ±13%" in result.test


def test_a_change_the_test_cannot_tell_from_noise_is_inconclusive_not_a_pass(gate):
    baseline, current = [1.00, 1.02, 1.01, 1.03, 1.00], [1.16, 1.17, 1.00, 1.18, 1.01]
    verdict = gate([make_case(BASE, image_s=current)], baseline_cases=[make_case(BASE, image_s=baseline)])
    result = finding(verdict, BASE, "s_per_image")
    assert result.decision == "inconclusive" and "more repeats would decide" in result.test
    assert "Inconclusive" in verdict.markdown()


def test_inconclusive_findings_do_not_fail_the_gate(gate):
    one = [make_case(BASE, image_s=[1.00])]
    only_images = GateRules(defaults={"s_per_step": {"enabled": False}})
    verdict = gate([make_case(BASE, image_s=[1.12])], baseline_cases=one, rules=only_images)
    assert finding(verdict, BASE, "s_per_image").decision == "inconclusive"
    assert verdict.exit_code == 0 and verdict.decision == "pass"


def test_per_step_samples_decide_what_one_image_per_run_cannot(gate):
    verdict = gate([make_case(BASE, image_s=[1.12])], baseline_cases=[make_case(BASE, image_s=[1.00])])
    assert finding(verdict, BASE, "s_per_image").decision == "inconclusive"
    steps = finding(verdict, BASE, "s_per_step")
    assert steps.decision == "regression" and "n=4 vs 4" in steps.test


@pytest.mark.parametrize("repeats", [3, 5])
def test_noise_alone_passes_in_nearly_all_of_200_random_trials(repeats):
    rng = np.random.default_rng(repeats)
    cv = 0.02  # a noisy runner: twice the usual run-to-run variation, plus occasional slow outliers

    def run(name):
        return run_in_memory(name, [make_case(key, image_s=noisy(rng, s, repeats, cv)) for key, (s, _, _) in CASES.items()])

    failures = sum(compare(run("baseline"), run("current")).exit_code for _ in range(200))
    assert failures / 200 <= 0.03


def slowdown_trials(repeats: int, cv: float, trials: int = 200):
    """(baseline, current, verdict) of ``trials`` one-case run pairs where the current run is truly 10% slower."""
    rng = np.random.default_rng(repeats)
    for _ in range(trials):
        base, cur = noisy(rng, 1.0, repeats, cv), noisy(rng, 1.10, repeats, cv)
        yield base, cur, compare(run_in_memory("baseline", [make_case(BASE, image_s=base)]),
                                 run_in_memory("current", [make_case(BASE, image_s=cur)]))


@pytest.mark.parametrize("cv", [0.01, 0.02])
def test_a_real_10_percent_slowdown_fails_in_nearly_all_of_200_random_trials(cv):
    failures = sum(verdict.exit_code for _, _, verdict in slowdown_trials(repeats=5, cv=cv))
    assert failures / 200 >= 0.97


def test_with_3_repeats_only_a_slow_baseline_outlier_hides_a_real_slowdown():
    missed = [(base, cur) for base, cur, verdict in slowdown_trials(repeats=3, cv=0.01) if verdict.exit_code == 0]
    assert len(missed) / 200 <= 0.1
    assert all(max(base) > min(cur) for base, cur in missed)


def test_a_speedup_is_an_improvement_and_passes(gate, draw):
    verdict = gate([draw(BASE, slowdown=0.85), draw(QUANT), draw(OFFLOAD)])
    assert finding(verdict, BASE, "s_per_image").decision == "improvement"
    assert verdict.exit_code == 0
    assert "#### Improvements" in verdict.markdown()


def test_a_large_improvement_fails_only_when_asked(gate, draw):
    verdict = gate([draw(BASE, slowdown=0.5), draw(QUANT), draw(OFFLOAD)])
    assert finding(verdict, BASE, "s_per_image").decision == "large_improvement"
    assert verdict.exit_code == 0
    runs = verdict.baseline.path, verdict.current.path
    assert compare_runs(*runs, fail_on_improvement=True).exit_code == 1
    assert compare_runs(*runs, rules=GateRules(fail_on_improvement=True)).exit_code == 1


# ---------------------------------------------------------------------------------- memory
def test_a_3_percent_vram_growth_is_a_memory_regression(gate, draw):
    verdict = gate([draw(BASE, memory=dict(gpu_reserved_peak_gib=20.6)), draw(QUANT), draw(OFFLOAD)])
    grown = finding(verdict, BASE, "gpu_reserved_peak_gib")
    assert grown.decision == "regression"
    assert grown.change == pytest.approx(0.03)
    assert grown.delta == pytest.approx(0.6)
    assert verdict.exit_code == 1


def test_a_memory_growth_under_the_absolute_floor_passes(gate):
    small = dict(gpu_allocated_peak_gib=1.0)
    verdict = gate([make_case(BASE, image_s=[1.0] * 3, memory=dict(gpu_allocated_peak_gib=1.1))],
                   baseline_cases=[make_case(BASE, image_s=[1.0] * 3, memory=small)])
    assert finding(verdict, BASE, "gpu_allocated_peak_gib").decision == "pass"  # +10%, but only 0.1 GiB
    assert verdict.exit_code == 0


def test_memory_not_measured_on_one_side_is_skipped_with_the_reason(gate, draw):
    cpu_only = dict(gpu_allocated_peak_gib=None, gpu_reserved_peak_gib=None, gpu_device_peak_gib=None)
    verdict = gate([draw(BASE, memory=cpu_only), draw(QUANT), draw(OFFLOAD)])
    skipped = finding(verdict, BASE, "gpu_device_peak_gib")
    assert skipped.decision == "skipped"
    assert "current: gpu_device_peak_gib not measured in this test" in skipped.test
    assert finding(verdict, BASE, "host_rss_peak_gib").decision == "pass"
    assert verdict.exit_code == 0


def test_a_peak_growing_from_zero_is_a_regression_and_the_json_stays_standard(gate):
    verdict = gate([make_case(BASE, image_s=[1.0] * 3, memory=dict(gpu_allocated_peak_gib=1.0))],
                   baseline_cases=[make_case(BASE, image_s=[1.0] * 3, memory=dict(gpu_allocated_peak_gib=0.0))])
    assert finding(verdict, BASE, "gpu_allocated_peak_gib").decision == "regression"
    data = json.loads(verdict.to_json(), parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    grown = next(f for f in data["cases"][0]["findings"] if f["metric"] == "gpu_allocated_peak_gib")
    assert (grown["change"], grown["delta"]) == ("inf", 1.0)


# ----------------------------------------------------------------------------------- drift
def test_a_psnr_drop_beyond_the_threshold_is_a_drift_regression(gate, draw):
    verdict = gate([draw(BASE), draw(QUANT, drift=dict(psnr=30.5, ssim=0.945)), draw(OFFLOAD)])
    assert finding(verdict, QUANT, "psnr").decision == "regression"  # -1.5 dB
    assert finding(verdict, QUANT, "ssim").decision == "pass"  # -0.005
    assert verdict.exit_code == 1


# ---------------------------------------------------------------------------------- status
@pytest.mark.parametrize("status", ["oom", "host_oom", "error", "timeout"])
def test_ok_becoming_a_failure_is_always_a_regression(gate, draw, status):
    failed = with_changes(make_case(BASE, status=status, repeats=REPEATS), error="Traceback (most recent call last):\n  ...\nCUDA out of memory")
    verdict = gate([failed, draw(QUANT), draw(OFFLOAD)])
    case = named(verdict.cases, BASE)
    assert [f.metric for f in case.findings] == ["status"]
    assert case.findings[0].decision == "regression"
    assert f"ok → {status}: CUDA out of memory" in case.findings[0].test
    assert verdict.exit_code == 1


def test_a_failure_becoming_ok_is_an_improvement(gate, draw, baseline):
    verdict = gate([draw(key) for key in CASES], baseline_cases=[make_case(BASE, status="oom", repeats=REPEATS), *baseline[1:]])
    assert finding(verdict, BASE, "status").decision == "improvement"
    assert verdict.exit_code == 0


def test_a_case_missing_from_the_current_run_fails_the_gate(gate, draw):
    verdict = gate([draw(BASE), draw(QUANT)])
    missing = finding(verdict, OFFLOAD, "status")
    assert missing.decision == "regression"
    assert missing.test == "case missing from the current run"
    assert verdict.exit_code == 1


def test_a_missing_case_is_only_reported_when_the_rules_say_so(gate, draw):
    verdict = gate([draw(BASE), draw(QUANT)], rules=GateRules(missing_case="report"))
    assert finding(verdict, OFFLOAD, "status").decision == "missing"
    assert verdict.exit_code == 0
    assert "#### Missing cases" in verdict.markdown() and OFFLOAD in verdict.markdown()


def test_a_case_new_in_the_current_run_is_reported_without_failing(gate, draw):
    verdict = gate([draw(key) for key in CASES] + [make_case("new-3d4e5f6a7b8c", image_s=[1.0])])
    new = finding(verdict, "new-3d4e5f6a7b8c", "status")
    assert (new.decision, new.test) == ("new", "case new in the current run (not in the baseline run)")
    assert verdict.exit_code == 0
    assert "#### New cases" in verdict.markdown() and "#### Missing cases" not in verdict.markdown()


# ----------------------------------------------------------------------------- environment
def test_runs_from_different_gpu_models_are_refused_even_when_env_changes_are_allowed(gate, draw):
    with pytest.raises(CompareError, match="different GPU models.*NVIDIA H100 80GB HBM3 → NVIDIA A100-SXM4-80GB"):
        gate([draw(key) for key in CASES], current_env=environment(gpu_name="NVIDIA A100-SXM4-80GB"),
             allow_env_change=True)


def test_cases_measured_on_another_gpu_model_are_refused_though_the_runs_started_on_one(gate, draw):
    """A run resumed on another machine keeps the environment it was created with; its records say where each case
    was measured."""
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    baseline = [draw(key, gpu=h100) for key in CASES]
    current = [draw(key, gpu=h200 if i == 0 else h100) for i, key in enumerate(CASES)]
    with pytest.raises(CompareError, match=rf"measured on different GPU models .*current: {h200} \(1 cases\)"):
        gate(current, baseline_cases=baseline)
    assert gate([draw(key, gpu=h100) for key in CASES], baseline_cases=baseline).exit_code == 0


def test_a_run_over_several_gpu_kinds_is_gated_case_by_case_against_the_same_kind(gate, draw):
    """A Ray run over H100 and H200 nodes: each case is compared with the same case, on the same kind."""
    kinds = ["NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA H200"]
    baseline = [draw(key, gpu=kind) for key, kind in zip(CASES, kinds)]
    assert gate([draw(key, gpu=kind) for key, kind in zip(CASES, kinds)], baseline_cases=baseline).exit_code == 0
    swapped = [draw(key, gpu=kind) for key, kind in zip(CASES, reversed(kinds))]
    with pytest.raises(CompareError, match="2 cases were measured on different GPU models"):
        gate(swapped, baseline_cases=baseline)


def test_a_ray_run_is_described_by_its_nodes_environments_not_the_drivers():
    from flux2bench.compare import measurement_environment

    host = environment()
    node = {**host, "gpu_name": "NVIDIA H200"}
    meta = {"environment": {**host, "gpu_name": None},
            "nodes": {"a": {"environment": node}, "b": {"environment": {**node, "driver": "580.1"}}}}
    merged = measurement_environment(meta)
    assert merged["gpu_name"] == "NVIDIA H200" and merged["driver"] == f"{host['driver']} | 580.1"
    assert measurement_environment({"environment": host}) == host


def test_a_ray_runs_host_is_its_nodes_stable_facts_and_its_label_names_them_together():
    from flux2bench.compare import measurement_environment

    nodes = {name: {"environment": environment(machine_id=name, host_ram_gib=ram)} for name, ram in
             (("node-a", 512.0), ("node-b", 1024.0))}
    run = measurement_environment({"environment": environment(), "nodes": nodes})
    assert host_differences(run, run) == []
    assert host_differences(run, measurement_environment({"environment": environment(), "nodes": {
        "node-a": nodes["node-a"]}}))  # one node fewer: another host
    labelled = measurement_environment({"environment": environment(host_label="ray-ci"), "nodes": nodes})
    assert labelled["host_label"] == "ray-ci"
    assert host_differences(labelled, {**labelled, "machine_id": "node-c"}) == []


@pytest.mark.parametrize("change, named", [
    (dict(driver="560.35.03"), "driver 550.54.15 → 560.35.03"),
    (dict(cuda="12.6"), "cuda 12.4 → 12.6"),
    (dict(versions=dict(diffusers="0.42.1")), "diffusers 0.42.0 → 0.42.1"),
])
def test_a_software_change_is_refused_unless_allowed_and_then_reported(gate, draw, change, named):
    current = [draw(key) for key in CASES]
    with pytest.raises(CompareError, match=f"{named}.*--allow-env-change"):
        gate(current, current_env=environment(**change))
    verdict = gate(current, current_env=environment(**change), allow_env_change=True)
    assert verdict.env_changes == [named]
    assert named in verdict.markdown()


def test_differences_outside_the_identity_fields_do_not_block_the_comparison(gate, draw):
    env = environment(python="3.12.1", cpu_count=32, git_commit="f" * 40, versions=dict(flux2bench="0.2.0"))
    assert gate([draw(key) for key in CASES], current_env=env).exit_code == 0


# ---------------------------------------------------------------------------------- inputs
def test_a_missing_run_directory_is_an_input_error(tmp_path, baseline):
    current = make_run(tmp_path, "current", baseline)
    with pytest.raises(CompareError, match="baseline run: .*nowhere: no such directory"):
        compare_runs(tmp_path / "nowhere", current)


def test_a_run_without_results_is_an_input_error(tmp_path, baseline):
    with pytest.raises(CompareError, match="current run .* has no case results"):
        compare_runs(make_run(tmp_path, "baseline", baseline), make_run(tmp_path, "current", []))


def test_an_unreadable_result_record_is_an_input_error_naming_the_file(tmp_path, baseline):
    current = make_run(tmp_path, "current", baseline)
    (current / "results" / f"{BASE}.json").write_text("{truncated")
    with pytest.raises(CompareError, match=f"current run: unreadable result record .*{BASE}.json"):
        compare_runs(make_run(tmp_path, "baseline", baseline), current)


# ----------------------------------------------------------------------------------- rules
@pytest.fixture
def gate_yaml(tmp_path):
    def write(text: str):
        path = tmp_path / "gate.yaml"
        path.write_text(text)
        return path

    return write


def test_a_block_override_applies_to_that_block_only(gate, draw, gate_yaml):
    rules = load_rules(gate_yaml("blocks:\n  base:\n    s_per_image: {threshold: 0.15}\n    s_per_step: {threshold: 0.15}\n"))
    verdict = gate([draw(BASE, slowdown=1.10), draw(QUANT, slowdown=1.10), draw(OFFLOAD)], rules=rules)
    assert {name: named(verdict.cases, name).decision for name in CASES} == {BASE: "pass", QUANT: "regression",
                                                                            OFFLOAD: "pass"}


def test_overrides_change_only_the_fields_they_name(gate_yaml):
    rules = load_rules(gate_yaml("defaults:\n  psnr: {max_drop: 2.0}\n  s_per_image: {threshold: 0.2}\n"
                                 "blocks:\n  base:\n    s_per_image: {alpha: 0.01}\n"))
    base, other = rules.for_block("base"), rules.for_block("quant")
    assert (base.s_per_image.threshold, base.s_per_image.alpha) == (0.2, 0.01)
    assert (other.s_per_image.threshold, other.s_per_image.alpha) == (0.2, 0.10)
    assert (base.psnr.max_drop, base.ssim.max_drop) == (2.0, 0.01)
    assert other.host_rss_peak_gib.floor_gib == 0.5


def test_a_disabled_metric_is_not_gated(gate, draw, gate_yaml):
    rules = load_rules(gate_yaml("defaults:\n  s_per_image: {enabled: false}\n  s_per_step: {enabled: false}\n"))
    verdict = gate([draw(BASE, slowdown=1.5), draw(QUANT), draw(OFFLOAD)], rules=rules)
    assert verdict.exit_code == 0
    assert "s_per_image" not in {f.metric for c in verdict.cases for f in c.findings}


@pytest.mark.parametrize("text, message", [
    ("treshold: 0.1\n", "treshold: Extra inputs are not permitted"),
    ("defaults:\n  s_per_imag: {threshold: 0.1}\n", "defaults.s_per_imag: Extra inputs are not permitted"),
    ("blocks:\n  base:\n    psnr: {max_dorp: 2}\n", "blocks.base.psnr.max_dorp: Extra inputs are not permitted"),
    ("defaults:\n  s_per_image: {threshold: -1}\n", "defaults.s_per_image.threshold: Input should be greater than"),
    ("missing_case: ignore\n", "missing_case: Input should be 'regression' or 'report'"),
])
def test_invalid_gate_rules_are_rejected_with_their_location(gate_yaml, text, message):
    with pytest.raises(CompareError, match=f"invalid gate rules .*gate.yaml:\n  .*{message}"):
        load_rules(gate_yaml(text))


@pytest.mark.parametrize("text", [None, "blocks: [unclosed\n"])
def test_an_unreadable_gate_file_is_an_input_error(tmp_path, gate_yaml, text):
    path = gate_yaml(text) if text else tmp_path / "absent.yaml"
    with pytest.raises(CompareError, match="cannot read gate rules"):
        load_rules(path)


# ---------------------------------------------------------------------------------- output
def test_the_json_verdict_holds_every_finding_and_the_exit_code(gate, draw):
    data = json.loads(gate([draw(BASE, slowdown=1.10), draw(QUANT), draw(OFFLOAD)]).to_json())
    assert (data["decision"], data["exit_code"]) == ("regression", 1)
    assert (data["baseline"]["run_id"], data["current"]["run_id"]) == ("baseline", "current")
    base = data["cases"][0]
    assert (base["label"], base["decision"]) == (f"case {BASE}", "regression")
    latency = next(f for f in base["findings"] if f["metric"] == "s_per_image")
    assert set(latency) == {"metric", "decision", "test", "baseline", "current", "change", "delta", "noise"}
    assert latency["current"] > latency["baseline"]


def test_the_markdown_summary_leads_with_the_verdict_and_a_table_of_failures(gate, draw):
    text = gate([draw(BASE, slowdown=1.10), draw(QUANT), draw(OFFLOAD)]).markdown()
    assert text.startswith("### ❌ flux2bench gate: regression")
    failing = text.split("#### Failing\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert failing[0].startswith("| Case | Metric | Baseline | Current | Change |")
    assert len(failing) == 2 + 2  # header, rule, s/image and s/step of the slowed case
    assert all(f"case {BASE}" in row and "+1" in row for row in failing[2:])
    assert "<details><summary>All cases</summary>" in text


def test_values_are_rounded_to_the_decimal_their_baseline_noise_reaches():
    assert rounded(1.23456, "s_per_image", noise=0.01) == "1.23"  # ±0.012 s: the hundredths are noise already
    assert rounded(1.23456, "s_per_image", noise=0.0005) == "1.2346"
    assert rounded(32.68123, "gpu_allocated_peak_gib") == "32.68"  # no samples: the report's own format
    assert rounded(125.86690902709961, "unknown") == "125.9"


def test_the_summary_counts_one_case_in_the_singular_and_rounds_its_timings(gate, draw):
    text = gate([draw(BASE, slowdown=1.5)], baseline_cases=[draw(BASE)]).markdown()
    assert "1 case (1 regression)." in text
    row = next(line for line in text.splitlines() if "| s_per_image |" in line)
    values = re.findall(r"(\d+\.\d+) s \|", row)
    assert len(values) == 2 and all(len(v.split(".")[1]) <= 3 for v in values)


def test_host_ram_sizes_of_two_hosts_are_shown_rounded():
    differences = host_differences(environment(host_ram_gib=125.86690902709961), environment(host_ram_gib=503.76))
    assert "host RAM 125.9 vs 503.8 GiB" in differences


def test_a_run_resumed_under_other_versions_is_compared_and_says_so(tmp_path):
    baseline = make_run(tmp_path, "baseline", [make_case(BASE, image_s=[1.0, 1.01, 0.99])])
    current = make_run(tmp_path, "current", [make_case(BASE, image_s=[1.0, 1.01, 0.99])])
    meta = json.loads((current / "run.json").read_text())
    meta["resumed"] = [{"environment": environment(versions={"torch": "2.12.0"})}]
    (current / "run.json").write_text(json.dumps(meta))
    verdict = compare_runs(baseline, current)
    assert verdict.resumed_changes == {"current": ["torch 2.7.1 → 2.12.0"]}
    assert ("> **Resumed under other versions** (current run: torch 2.7.1 → 2.12.0): a record does not say which "
            "session measured it") in verdict.markdown()
