"""Which case a case's drift is measured against (its drift baseline): identity, drift baseline settings, and the
preferred drift baseline."""

from __future__ import annotations

import pytest

from flux2bench import drift_baseline as baseline
from flux2bench.axes import registry

from records import case, result


@pytest.mark.parametrize("setting", [dict(precision="fp8"), dict(attention="native"), dict(offload="sequential"),
                                     dict(text_encoder="precomputed"), dict(max_vram_gib=8.0)])
def test_numerics_settings_do_not_change_the_baseline_identity(setting):
    assert baseline.drift_baseline_identity(case(**setting)) == baseline.drift_baseline_identity(case())


@pytest.mark.parametrize("workload", [dict(seeds=(3,)), dict(prompts=("another",)), dict(width=128), dict(steps=8),
                                      dict(reference_images=2), dict(guidance_scale=2.5), dict(weights="pretrained")])
def test_a_different_workload_has_a_different_baseline_identity(workload):
    assert baseline.drift_baseline_identity(case(**workload)) != baseline.drift_baseline_identity(case())


@pytest.mark.parametrize("setting, expected", [
    (dict(), True), (dict(offload="model"), True), (dict(precision="fp8", text_encoder_precision="fp8"), False),
    (dict(text_encoder_precision="nf4"), False), (dict(attention="flash"), False),
    (dict(text_encoder="precomputed"), True), (dict(max_vram_gib=12.0), False),
])
def test_a_baseline_is_bf16_sdpa_and_uncapped_with_either_text_encoder(setting, expected):
    assert baseline.is_drift_baseline(case(**setting)) is expected


def test_every_case_but_the_plain_baseline_needs_drift():
    assert not baseline.needs_drift(case())
    assert baseline.needs_drift(case(offload="group_leaf"))
    assert baseline.needs_drift(case(precision="nf4"))


def test_baseline_case_resets_numerics_and_keeps_the_text_encoder_placement():
    variant = case(precision="fp8", text_encoder_precision="nf4", attention="flash", offload="sequential",
                   text_encoder="precomputed", max_vram_gib=12.0, low_cpu_mem_usage=True)
    assert baseline.drift_baseline_case(variant, registry.drift_baseline_attempts()[0], variant.block) == case(
        text_encoder="precomputed")


@pytest.fixture
def offloaded_baselines():
    return {offload: result(offload=offload) for offload in ("sequential", "group_leaf", "model")}


def test_pick_baseline_prefers_no_offload(offloaded_baselines):
    plain = result()
    chosen = baseline.pick_drift_baseline(case(precision="fp8"), [*offloaded_baselines.values(), plain])
    assert chosen is plain


def test_pick_baseline_falls_back_to_the_lightest_offload(offloaded_baselines):
    chosen = baseline.pick_drift_baseline(case(precision="fp8"), list(offloaded_baselines.values()))
    assert chosen is offloaded_baselines["model"]


def test_pick_baseline_ignores_failed_runs_other_workloads_non_baselines_and_the_case_itself():
    variant = case(precision="fp8", offload="model")
    candidates = [result(status="oom"), result(steps=8), result(attention="native"),
                  result(precision="fp8", offload="model"), result(status="error", offload="model")]
    assert baseline.pick_drift_baseline(variant, candidates) is None
    assert baseline.pick_drift_baseline(case(offload="model"), [result(offload="model")]) is None
