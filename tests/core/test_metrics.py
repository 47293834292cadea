"""The metric registry: each quantity read one way, the memory peaks per phase, names declared once."""

from __future__ import annotations

import pytest

from flux2bench import drift, metrics
from flux2bench.results import STAGES, CaseResult
from flux2bench.report import results_frame
from flux2bench.trackers import latency
from records import drift as make_drift, phase, result


def test_the_stage_names_are_the_records_and_the_tracker_adds_only_the_whole_image():
    assert latency.STAGES == (*STAGES, "image")
    assert [spec.name for spec in metrics.of_kind("stage")] == [f"{stage}_s" for stage in STAGES]


def test_the_registry_names_every_drift_metric_drift_computes_and_no_other():
    assert tuple(spec.name for spec in metrics.of_kind("drift")) == drift.METRIC_NAMES


def test_a_peak_is_read_per_phase_and_the_larger_of_the_phases_is_its_own_reading():
    record = result(memory={"load": phase(gpu_reserved=20.0), "inference": phase(gpu_reserved=14.0)})
    assert metrics.peak(record, "gpu_reserved_peak_gib", "load").value == 20.0
    assert metrics.peak(record, "gpu_reserved_peak_gib", "inference").value == 14.0
    assert metrics.larger_peak(record, "gpu_reserved_peak_gib").value == 20.0
    assert metrics.vram_needed(record) == (20.0, "reserved peak (no device-level measurement)")


def test_a_missing_phase_is_not_measured_with_the_reason():
    record = result(status="oom", memory={"load": phase(gpu_device=5.0)})
    missing = metrics.peak(record, "gpu_device_peak_gib", "inference")
    assert missing.value is None and missing.reason == "no inference memory record (status oom)"
    assert metrics.larger_peak(record, "gpu_device_peak_gib").value == 5.0


def test_every_timing_is_the_median_of_the_samples_it_names():
    record = result(s_per_image=5.0, steps=4)
    record.latency.stages["image"] = [4.0, 5.0, 9.0]
    assert metrics.BY_NAME["s_per_image"].value(record) == 5.0
    assert metrics.BY_NAME["s_per_image"].samples(record) == [4.0, 5.0, 9.0]
    assert metrics.BY_NAME["load_s"].value(record) == 10.0


def test_a_drift_threshold_that_could_not_be_checked_is_said_in_the_report():
    baseline = result()
    variant = result(precision="fp8", drift=make_drift(baseline, psnr=40.0),
                     drift_thresholds=(("min_ms_ssim", 0.9), ("min_psnr", 30.0)))
    reasons = results_frame([baseline, variant]).attrs["reasons"]
    assert reasons[(variant.key, "drift_failed")] == "set but not checked (metric not measured): min_ms_ssim"


def compiled(events: dict | None, mode: str = "default") -> CaseResult:
    record = result(compile="regional", warmup=1)
    record.setup.axes["compile"] = {"compile": "regional", "mode": mode} | ({"events": events} if events else {})
    return record


def test_a_compiled_first_call_is_split_into_compiling_and_kernel_tuning_from_torchs_timers():
    # reports/throughput-h100-20261207-160726: FP8 per row, regional, batch 1 on an H100 (first call 194.9 s)
    record = compiled({"compile_s": 19.796, "timers_s": {"CachingAutotuner.coordinate_descent_tuning": 170.091,
                                                          "async_compile.wait": 4.165}})
    assert metrics.BY_NAME["compile_timer_s"].value(record) == 19.796
    assert metrics.BY_NAME["tuning_timer_s"].value(record) == 170.091
    assert "coordinate_descent_tuning" in metrics.BY_NAME["tuning_timer_s"].derive(record).method


def test_a_first_call_part_not_recorded_says_why():
    reasons = {name: metrics.BY_NAME["tuning_timer_s"].derive(record).reason for name, record in {
        "eager": result(), "older record": compiled(None), "no timers": compiled({"compile_s": 3.0}),
        "not kept": compiled({"compile_s": 3.0, "timers_s": {"async_compile.wait": 1.0}}),
        "corrupt": compiled({"compile_s": 3.0, "timers_s": {"CachingAutotuner.coordinate_descent_tuning": -1.0}}),
    }.items()}
    assert reasons == {"eager": "nothing compiled", "older record": "not recorded by this version",
                       "no timers": "not recorded by this version",
                       "not kept": "not among the 20 largest compile timers kept",
                       "corrupt": "not a duration in the record: -1.0"}
    assert metrics.BY_NAME["compile_timer_s"].value(compiled({"compile_s": float("nan")})) is None


def test_max_autotunes_kernel_choice_is_the_sum_of_its_timers_for_every_operator():
    # inductor's max-autotune compiles, then benchmarks, about a hundred candidate kernels per matrix product shape
    record = compiled({"compile_s": 400.0, "timers_s": {"scaled_mm_template_autotuning": 360.6,
                                                         "scaled_mm_template_precompiling": 12.5,
                                                         "mm_template_autotuning": 2.0,
                                                         "CachingAutotuner.coordinate_descent_tuning": 224.0}},
                      mode="max-autotune-no-cudagraphs")
    assert metrics.BY_NAME["autotune_timer_s"].value(record) == pytest.approx(375.1)
    assert "_template_autotuning" in metrics.BY_NAME["autotune_timer_s"].derive(record).method


def test_a_kernel_choice_not_recorded_says_why():
    timers = {"compile_s": 3.0, "timers_s": {"async_compile.wait": 1.0}}
    reasons = {name: metrics.BY_NAME["autotune_timer_s"].derive(record).reason for name, record in {
        "default mode": compiled(timers),
        "max-autotune, not kept": compiled(timers, mode="max-autotune"),
        "corrupt": compiled({"compile_s": 3.0, "timers_s": {"mm_template_autotuning": 5.0,
                                                             "mm_template_precompiling": -1.0}}, mode="max-autotune"),
    }.items()}
    assert reasons == {"default mode": "compile mode default benchmarks no candidate kernels",
                       "max-autotune, not kept": "not among the 20 largest compile timers kept",
                       "corrupt": "not a duration in the record: [5.0, -1.0]"}


def test_every_drift_metric_is_computed_shown_bounded_and_limited_from_its_one_entry():
    from flux2bench import drift_metrics
    from flux2bench.drift import METRIC_NAMES
    from flux2bench.record_checks import DRIFT_RANGES
    from flux2bench.scenario import DriftThresholds

    names = [m.name for m in drift_metrics.DRIFT_METRICS]
    assert list(METRIC_NAMES) == names == [spec.name for spec in metrics.of_kind("drift")] == list(DRIFT_RANGES)
    assert set(DriftThresholds.model_fields) == set(drift_metrics.BY_LIMIT)
    for metric in drift_metrics.DRIFT_METRICS:
        assert metrics.BY_NAME[metric.name].lower_is_better is not metric.higher_is_better
        assert metric.limit is None or metric.limit.startswith("min_" if metric.higher_is_better else "max_")
