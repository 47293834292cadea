"""Drift: image and latent metrics on known inputs, baseline matching, thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from flux2bench import drift
from flux2bench.drift import DriftThresholds
from flux2bench.results import Drift, Metric
from records import gradient_image, result, save_outputs, with_noise


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return gradient_image(128)


# --- image metrics --------------------------------------------------------------------------------

def test_identical_images_have_capped_psnr_ssim_one_and_zero_mae(image):
    psnr = drift.psnr(image, image)
    assert psnr.value == drift.PSNR_CAP_DB
    assert f"capped at {drift.PSNR_CAP_DB:g} dB" in psnr.method
    assert drift.ssim(image, image).value == pytest.approx(1.0)
    assert drift.mae(image, image).value == 0.0


@pytest.mark.parametrize("sigma", [4.0, 8.0, 16.0])
def test_psnr_of_gaussian_noise_matches_its_level(image, sigma):
    measured = drift.psnr(with_noise(image, sigma), image).value
    assert measured == pytest.approx(20 * math.log10(255 / sigma), abs=0.15)


@pytest.mark.parametrize("sigma", [4.0, 16.0])
def test_mae_of_gaussian_noise_is_its_mean_absolute_deviation(image, sigma):
    assert drift.mae(with_noise(image, sigma), image).value == pytest.approx(sigma * math.sqrt(2 / math.pi), rel=0.03)


def test_ssim_falls_as_noise_grows(image):
    values = [drift.ssim(with_noise(image, sigma), image).value for sigma in (2.0, 8.0, 32.0)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


def test_ms_ssim_is_one_for_identical_images_large_enough_for_five_scales():
    big = gradient_image(192)
    assert drift.ms_ssim(big, big).value == pytest.approx(1.0)
    assert drift.ms_ssim(with_noise(big, 16.0), big).value < 0.99


def test_ms_ssim_is_unmeasured_with_a_reason_on_images_too_small_for_five_scales():
    small = gradient_image(64)
    metric = drift.ms_ssim(small, small)
    assert metric.value is None
    assert "64x64 is too small for 5 scales" in metric.reason


def test_pil_images_and_numpy_arrays_give_the_same_metrics(image):
    noisy = with_noise(image, 8.0)
    assert drift.psnr(Image.fromarray(noisy), Image.fromarray(image)).value == drift.psnr(noisy, image).value


def test_images_of_different_size_are_rejected(image):
    with pytest.raises(ValueError, match="differ in size"):
        drift.psnr(image, gradient_image(64))


def test_lpips_is_reported_unavailable_without_local_weights_never_faked(image, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metric = drift.lpips(image, image)
    assert metric.value is None
    assert "LPIPS" in metric.method and metric.reason


# --- latent metrics -------------------------------------------------------------------------------

@pytest.fixture
def latents() -> torch.Tensor:
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))


def test_identical_latents_have_cosine_one_and_zero_relative_l2(latents):
    assert drift.latent_cosine(latents, latents).value == pytest.approx(1.0)
    assert drift.latent_rel_l2(latents, latents).value == 0.0


def test_relative_l2_is_the_noise_norm_over_the_baseline_norm(latents):
    noise = 0.05 * latents.norm() * torch.nn.functional.normalize(torch.randn_like(latents).flatten(), dim=0)
    assert drift.latent_rel_l2(latents + noise.view_as(latents), latents).value == pytest.approx(0.05, rel=1e-5)


def test_negated_latents_have_cosine_minus_one(latents):
    assert drift.latent_cosine(-latents, latents).value == pytest.approx(-1.0)


def test_latent_metrics_are_undefined_against_all_zero_latents(latents):
    zeros = torch.zeros_like(latents)
    assert drift.latent_cosine(latents, zeros).value is None
    assert drift.latent_rel_l2(latents, zeros).reason == "undefined: the baseline latents are all zeros"


# --- comparing a case with its baseline -----------------------------------------------------------

@pytest.fixture
def baseline_images() -> list[np.ndarray]:
    return [with_noise(gradient_image(64), 20.0, seed) for seed in range(4)]


@pytest.fixture
def baseline_latents() -> list[torch.Tensor]:
    return [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(4)]


@pytest.fixture
def baseline(tmp_path, baseline_images, baseline_latents):
    return save_outputs(tmp_path, result(), baseline_images, baseline_latents)


def test_outputs_are_paired_by_prompt_and_seed_and_averaged(tmp_path, baseline, baseline_images, baseline_latents):
    variant = save_outputs(tmp_path, result(precision="fp8"), [with_noise(im, 8.0, 99) for im in baseline_images],
                           baseline_latents)
    variant.outputs.reverse()  # the order of outputs must not matter
    found = drift.compare_outputs(tmp_path, variant, baseline)
    assert found.baseline_key == baseline.key
    assert found.metrics["psnr"].value == pytest.approx(20 * math.log10(255 / 8.0), abs=0.3)
    assert "mean over 4 images" in found.metrics["psnr"].method
    assert found.metrics["latent_cosine"].value == pytest.approx(1.0)


def test_identical_outputs_show_no_drift(tmp_path, baseline, baseline_images, baseline_latents):
    twin = save_outputs(tmp_path, result(attention="native"), baseline_images, baseline_latents)
    metrics = drift.compare_outputs(tmp_path, twin, baseline).metrics
    assert (metrics["psnr"].value, metrics["ssim"].value, metrics["mae"].value) == (drift.PSNR_CAP_DB, 1.0, 0.0)
    assert (metrics["latent_cosine"].value, metrics["latent_rel_l2"].value) == (pytest.approx(1.0), 0.0)


def test_drift_on_synthetic_weights_is_labelled_numeric_drift(tmp_path, baseline, baseline_images):
    variant = save_outputs(tmp_path, result(precision="fp8"), baseline_images)
    assert drift.compare_outputs(tmp_path, variant, baseline).label == "numeric drift on synthetic weights"
    assert drift.drift_label("pretrained") == "drift against the bf16 baseline"


def test_outputs_without_a_shared_prompt_and_seed_leave_every_metric_unmeasured(tmp_path, baseline, baseline_images):
    other_seeds = save_outputs(tmp_path, result(precision="fp8", seeds=(7, 8)), baseline_images)
    metrics = drift.compare_outputs(tmp_path, other_seeds, baseline).metrics
    assert set(metrics) == set(drift.METRIC_NAMES)
    assert all(m.value is None and "no output shares a prompt and seed" in m.reason for m in metrics.values())


def test_missing_latents_leave_only_the_latent_metrics_unmeasured(tmp_path, baseline, baseline_images):
    without_latents = save_outputs(tmp_path, result(precision="fp8"), baseline_images)
    metrics = drift.compare_outputs(tmp_path, without_latents, baseline).metrics
    assert metrics["latent_cosine"] == Metric.missing("latent_cosine", "no saved latents for this case")
    assert metrics["psnr"].value == drift.PSNR_CAP_DB


def test_images_missing_from_the_run_directory_leave_every_metric_unmeasured_with_the_path(tmp_path, baseline,
                                                                                          baseline_images):
    variant = save_outputs(tmp_path, result(precision="fp8"), baseline_images)
    for output in baseline.outputs:
        (tmp_path / output.image).unlink()
    metrics = drift.compare_outputs(tmp_path, variant, baseline).metrics
    assert all(m.value is None and "image not in the run directory" in m.reason for m in metrics.values())
    assert baseline.outputs[0].image in metrics["psnr"].reason


def test_a_metric_measured_on_some_pairs_only_says_how_many():
    per_pair = [Metric(1.0, "m"), Metric.missing("m", "why"), Metric(3.0, "m")]
    assert drift._mean_metric("x", per_pair, 3) == Metric(
        2.0, "m; mean over 2 of the case's 3 images (the others have no baseline image of the same prompt and seed, "
             "or no value)")


# --- thresholds -----------------------------------------------------------------------------------

@pytest.fixture
def measured_drift() -> Drift:
    metrics = dict(psnr=28.0, ssim=0.95, ms_ssim=None, mae=3.0, latent_cosine=0.999, latent_rel_l2=0.04)
    return Drift("base", "numeric drift on synthetic weights",
                 {name: Metric(value, "fixture", None if value is not None else "too small") for name, value in
                  metrics.items()})


def test_broken_thresholds_are_named(measured_drift):
    thresholds = DriftThresholds(min_psnr=30, min_ssim=0.9, max_mae=2.0, max_latent_rel_l2=0.05)
    assert drift.apply_thresholds(measured_drift, thresholds) == ["min_psnr", "max_mae"]


def test_values_exactly_at_a_threshold_pass(measured_drift):
    thresholds = DriftThresholds(min_psnr=28.0, min_ssim=0.95, max_mae=3.0, min_latent_cosine=0.999,
                                 max_latent_rel_l2=0.04)
    assert drift.apply_thresholds(measured_drift, thresholds) == []


def test_an_unmeasured_metric_never_breaks_its_threshold_but_is_reported_unchecked(measured_drift):
    thresholds = DriftThresholds(min_ms_ssim=0.99, min_psnr=20)
    assert drift.apply_thresholds(measured_drift, thresholds) == []
    assert drift.unchecked_thresholds(measured_drift, thresholds) == ["min_ms_ssim"]


def test_thresholds_reject_unknown_names():
    with pytest.raises(ValidationError, match="min_lpips"):
        DriftThresholds(min_lpips=0.1)
