"""compare shows where two profiled steps differ, per category group, reported and never gated."""

from __future__ import annotations

from flux2bench.compare import compare_runs
from flux2bench.profiling.record import Profile, StepCategory, StepTime
from records import gpu_result, write_run


def profiled(matmul_ms: float, idle_ms: float):
    record = gpu_result(device=20.0, reserved=19.0)
    step = StepTime("cuda", 1, matmul_ms + idle_ms, [StepCategory("matmul bf16", "matmul", matmul_ms, matmul_ms, 9),
                                                     StepCategory("idle", "idle", idle_ms, idle_ms, 0)], None)
    record.profile = Profile("test", memory_reason="x", load_reason="x", step=step)
    return record


def test_the_profiled_steps_categories_are_reported_not_gated(tmp_path):
    baseline = write_run(tmp_path / "baseline", [profiled(400.0, 100.0)])
    current = write_run(tmp_path / "current", [profiled(400.0, 300.0)])
    [case] = compare_runs(baseline, current).cases
    found = {f.metric: f for f in case.findings if f.metric.startswith("profiled step")}
    assert set(found) == {"profiled step: matmul ms", "profiled step: idle ms"}
    assert (found["profiled step: idle ms"].baseline, found["profiled step: idle ms"].current) == (100.0, 300.0)
    assert {f.decision for f in found.values()} == {"reported"}


def test_a_case_profiled_on_one_side_only_adds_nothing(tmp_path):
    baseline = write_run(tmp_path / "baseline", [gpu_result(device=20.0, reserved=19.0)])
    current = write_run(tmp_path / "current", [profiled(400.0, 300.0)])
    [case] = compare_runs(baseline, current).cases
    assert not [f for f in case.findings if f.metric.startswith("profiled step")]
