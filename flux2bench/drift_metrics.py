"""The drift metrics, one entry each: the range a value lies in, its direction, and the scenario's limit on it.

How each is computed lives in ``flux2bench.drift``, how it is shown in ``flux2bench.metrics``; the range that records
read back are held to (``flux2bench.record_checks``), the bounds of a scenario's limits (``drift:`` in a block,
``flux2bench.scenario.DriftThresholds``) and which way a limit passes (``flux2bench.drift``) all come from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DriftMetric:
    name: str
    low: float
    high: float
    higher_is_better: bool
    limit: str | None  # the scenario's limit on it (``drift: {limit: value}``): min_ for higher-is-better, else max_
    # how far float rounding may carry a computed value beyond [low, high] (a correlation of identical images)
    rounding: float = 0.0


DRIFT_METRICS: tuple[DriftMetric, ...] = (
    DriftMetric("psnr", 0.0, 100.0, True, "min_psnr"),  # capped at 100 dB: identical images (drift.PSNR_CAP_DB)
    DriftMetric("ssim", -1.0, 1.0, True, "min_ssim", rounding=1e-6),
    DriftMetric("ms_ssim", -1.0, 1.0, True, "min_ms_ssim", rounding=1e-6),
    DriftMetric("mae", 0.0, 255.0, False, "max_mae"),  # RGB 0..255
    DriftMetric("lpips", 0.0, math.inf, False, None),
    DriftMetric("latent_cosine", -1.0, 1.0, True, "min_latent_cosine", rounding=1e-6),
    DriftMetric("latent_rel_l2", 0.0, math.inf, False, "max_latent_rel_l2"),
)
BY_NAME = {metric.name: metric for metric in DRIFT_METRICS}
BY_LIMIT = {metric.limit: metric for metric in DRIFT_METRICS if metric.limit is not None}
