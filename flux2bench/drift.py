"""Drift: how far a case's outputs are from its bf16 baseline's (``flux2bench.baseline`` says which that is).

Pure functions, no pipeline code. Image metrics compare two same-size uint8 RGB images, latent
metrics the final latents; ``compare_outputs`` pairs a case's outputs with its baseline's by
(prompt, seed) and averages each metric over the pairs. With synthetic weights the numbers measure
how much a setting perturbs the computation, not image quality, and are labelled so.
"""

from __future__ import annotations

import operator
import statistics
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from flux2bench.drift_metrics import BY_LIMIT
from flux2bench.results import CaseResult, Drift, ImageOutput, Metric
from flux2bench.store import inside
from flux2bench.scenario import DriftThresholds

SYNTHETIC_LABEL = "numeric drift on synthetic weights"
PRETRAINED_LABEL = "drift against the bf16 baseline"
# Identical images have infinite PSNR; a finite cap keeps means, thresholds, plots and JSON usable.
PSNR_CAP_DB = 100.0
PIXEL_RANGE = 255.0

ImageLike = Image.Image | np.ndarray


def drift_label(weights: str) -> str:
    return SYNTHETIC_LABEL if weights == "synthetic" else PRETRAINED_LABEL


# --- image and latent metrics -------------------------------------------------------------------

def _rgb_array(image: ImageLike) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {array.dtype} {array.shape}")
    return array


def _pair(image: ImageLike, baseline: ImageLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _rgb_array(image), _rgb_array(baseline)
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}")
    return a, b


def _nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)


# torchmetrics is imported where used: importing it takes seconds, and the report only needs labels and matching.
def psnr(image: ImageLike, baseline: ImageLike) -> Metric:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _pair(image, baseline)
    value = peak_signal_noise_ratio(_nchw(a), _nchw(b), data_range=PIXEL_RANGE).item()
    method = f"PSNR in dB over RGB 0..255, capped at {PSNR_CAP_DB:g} dB (identical images)"
    return Metric(min(value, PSNR_CAP_DB), method)


def ssim(image: ImageLike, baseline: ImageLike) -> Metric:
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _pair(image, baseline)
    value = structural_similarity_index_measure(_nchw(a), _nchw(b), data_range=PIXEL_RANGE).item()
    return Metric(value, "SSIM over RGB, 11-px Gaussian window (sigma 1.5)")


def ms_ssim(image: ImageLike, baseline: ImageLike) -> Metric:
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    a, b = _pair(image, baseline)
    method = "MS-SSIM over RGB, 5 scales, 11-px Gaussian window"
    try:
        value = multiscale_structural_similarity_index_measure(_nchw(a), _nchw(b), data_range=PIXEL_RANGE).item()
    except ValueError as exc:  # torchmetrics refuses images too small for 5 scales
        return Metric.missing(method, f"image {a.shape[1]}x{a.shape[0]} is too small for 5 scales: {exc}")
    return Metric(value, method)


def mae(image: ImageLike, baseline: ImageLike) -> Metric:
    a, b = _pair(image, baseline)
    value = float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
    return Metric(value, "mean absolute pixel error over RGB 0..255")


def _lpips_weights_missing() -> str | None:
    """Why LPIPS cannot run without a download, or None when its backbone weights are cached locally."""
    try:
        import torchvision
    except ImportError:
        return "torchvision (LPIPS backbone) is not installed"
    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return None if cached.is_file() else f"AlexNet weights for LPIPS are not available locally ({cached})"


def lpips(image: ImageLike, baseline: ImageLike) -> Metric:
    a, b = _pair(image, baseline)
    method = "LPIPS (AlexNet)"
    missing = _lpips_weights_missing()
    if missing:
        return Metric.missing(method, missing)
    from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

    value = learned_perceptual_image_patch_similarity(
        _nchw(a) / PIXEL_RANGE, _nchw(b) / PIXEL_RANGE, net_type="alex", normalize=True).item()
    return Metric(value, method)


def latent_cosine(latents: torch.Tensor, baseline: torch.Tensor) -> Metric:
    a, b = latents.flatten().double(), baseline.flatten().double()
    method = "cosine similarity of the final latents"
    if not a.norm() or not b.norm():
        return Metric.missing(method, "undefined: a latent tensor is all zeros")
    return Metric(torch.nn.functional.cosine_similarity(a, b, dim=0).item(), method)


def latent_rel_l2(latents: torch.Tensor, baseline: torch.Tensor) -> Metric:
    a, b = latents.flatten().double(), baseline.flatten().double()
    method = "relative L2 of the final latents, ||x - baseline|| / ||baseline||"
    if not b.norm():
        return Metric.missing(method, "undefined: the baseline latents are all zeros")
    return Metric((torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item(), method)


IMAGE_METRICS: dict[str, Callable[[ImageLike, ImageLike], Metric]] = {
    "psnr": psnr, "ssim": ssim, "ms_ssim": ms_ssim, "mae": mae, "lpips": lpips,
}
LATENT_METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], Metric]] = {
    "latent_cosine": latent_cosine, "latent_rel_l2": latent_rel_l2,
}
METRIC_NAMES = (*IMAGE_METRICS, *LATENT_METRICS)


# --- comparing a case's outputs with its baseline's ---------------------------------------------

def _output_metrics(run_dir: Path, output: ImageOutput, baseline: ImageOutput) -> dict[str, Metric]:
    absent = [path for path in (output.image, baseline.image) if not inside(run_dir, path).is_file()]
    if absent:  # e.g. a copy of the run directory without its raw outputs
        reason = f"image not in the run directory: {', '.join(absent)}"
        return {name: Metric.missing(name, reason) for name in METRIC_NAMES}
    try:
        image, reference = (_load_image(run_dir, name) for name in (output.image, baseline.image))
    except ValueError as exc:
        return {name: Metric.missing(name, str(exc)) for name in METRIC_NAMES}
    metrics = {name: fn(image, reference) for name, fn in IMAGE_METRICS.items()}
    if output.latents and baseline.latents:
        try:
            latents, reference_latents = (_load_latents(run_dir, name) for name in (output.latents, baseline.latents))
        except ValueError as exc:
            return metrics | {name: Metric.missing(name, str(exc)) for name in LATENT_METRICS}
        metrics |= {name: fn(latents, reference_latents) for name, fn in LATENT_METRICS.items()}
    else:
        which = "this case" if not output.latents else "the baseline"
        metrics |= {name: Metric.missing(name, f"no saved latents for {which}") for name in LATENT_METRICS}
    return metrics


def _load_image(run_dir: Path, name: str) -> Image.Image:
    path = inside(run_dir, name)
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except OSError as exc:  # not an image, or a truncated one
        raise ValueError(f"damaged image in the run directory: {path}: {exc}") from None


def _load_latents(run_dir: Path, name: str) -> torch.Tensor:
    path = inside(run_dir, name)
    try:
        return load_file(path)["latents"]
    except (OSError, KeyError, SafetensorError) as exc:
        raise ValueError(f"damaged latents in the run directory: {path}: {exc!r}") from None


def _mean_metric(name: str, per_pair: list[Metric], images: int) -> Metric:
    """The mean over the case's images that have a baseline image of the same prompt and seed; its method says over
    how many of the case's ``images`` (distinct prompt and seed pairs) it is."""
    if not per_pair:
        return Metric.missing(name, "no output shares a prompt and seed with the baseline")
    values = [m.value for m in per_pair if m.value is not None]
    if not values:
        return Metric.missing(per_pair[0].method, per_pair[0].reason)
    over = (f"mean over {len(values)} images" if len(values) == images else
            f"mean over {len(values)} of the case's {images} images (the others have no baseline image of the same "
            "prompt and seed, or no value)")
    return Metric(statistics.fmean(values), f"{per_pair[0].method}; {over}")


def _outputs_by_prompt_and_seed(result: CaseResult) -> dict[tuple[str, int], ImageOutput]:
    by_key: dict[tuple[str, int], ImageOutput] = {}
    for output in result.outputs:  # repeats of one (prompt, seed) compute the same image: the first stands for all
        by_key.setdefault((result.case.prompts[output.prompt], output.seed), output)
    return by_key


def compare_outputs(run_dir: str | Path, result: CaseResult, baseline_result: CaseResult) -> Drift:
    """The case's drift against its baseline: each metric averaged over the outputs paired by (prompt, seed)."""
    run_dir = Path(run_dir)
    baseline_outputs = _outputs_by_prompt_and_seed(baseline_result)
    outputs = _outputs_by_prompt_and_seed(result)
    pairs = [(output, baseline_outputs[key]) for key, output in outputs.items() if key in baseline_outputs]
    per_pair = [_output_metrics(run_dir, output, baseline) for output, baseline in pairs]
    metrics = {name: _mean_metric(name, [m[name] for m in per_pair], len(outputs)) for name in METRIC_NAMES}
    return Drift(baseline_key=baseline_result.key, label=drift_label(result.weights), metrics=metrics)


# --- thresholds ----------------------------------------------------------------------------------

# threshold field -> (metric name, test that the value passes)
_THRESHOLD_CHECKS: dict[str, tuple[str, Callable[[float, float], bool]]] = {
    limit: (metric.name, operator.ge if metric.higher_is_better else operator.le) for limit, metric in BY_LIMIT.items()}


def _set_thresholds(drift: Drift, thresholds: DriftThresholds) -> list[tuple[str, float, float | None]]:
    """(threshold name, limit, measured value) for every threshold the scenario set."""
    checks = []
    for name, limit in thresholds.model_dump(exclude_none=True).items():
        metric = drift.metrics.get(_THRESHOLD_CHECKS[name][0])
        checks.append((name, limit, metric.value if metric else None))
    return checks


def apply_thresholds(drift: Drift, thresholds: DriftThresholds) -> list[str]:
    """Names of the thresholds the drift breaks; an unmeasured metric breaks none (see unchecked_thresholds)."""
    return [name for name, limit, value in _set_thresholds(drift, thresholds)
            if value is not None and not _THRESHOLD_CHECKS[name][1](value, limit)]


def unchecked_thresholds(drift: Drift, thresholds: DriftThresholds) -> list[str]:
    """Names of the thresholds that were set but could not be checked because their metric is unmeasured."""
    return [name for name, _, value in _set_thresholds(drift, thresholds) if value is None]
