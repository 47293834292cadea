"""The metric registry: every number a report, the gate and the export read from a record, declared once.

A ``MetricSpec`` names a metric, says how to read it from a ``CaseResult`` (for memory: in which phase), its
unit, which direction is better, how a table formats it and whether the gate checks it by default. Report
columns, the gate's findings and the export's fields are all driven by ``METRICS``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Literal

from flux2bench.results import CaseResult, Metric

Kind = Literal["memory", "latency", "stage", "energy", "drift"]
STAGES = ("text_encoding", "reference_encoding", "denoise", "vae_decode")


@dataclass(frozen=True)
class MetricSpec:
    name: str  # the record's name: a PhaseMemory field, a latency figure, a stage or a drift metric
    header: str  # table header
    unit: str
    kind: Kind
    fmt: str = "{:.2f}"
    lower_is_better: bool = True
    gate: dict[str, Any] | None = None  # checked by the regression gate, with these rule defaults; None: not gated
    column: str = ""  # the report's column name (default: name)
    in_table: bool = True  # a column of the report's results table
    host_bound: bool = False  # depends on the host (CPU, RAM, PCIe) whatever the case; see also axes' host_bound
    optional: bool = False  # a report column only where some record has it (records of earlier versions do not)

    @property
    def column_name(self) -> str:
        return self.column or self.name


def memory_peak(result: CaseResult, name: str, phase: str | None = None) -> Metric:
    """A memory metric in one phase, or (phase None) its highest value over the load and inference phases."""
    if phase is None:
        phases = list(result.memory.values())
    else:
        phases = [result.memory[phase]] if phase in result.memory else []
    metrics = [getattr(memory, name) for memory in phases]
    measured = [m for m in metrics if m.value is not None]
    if measured:
        top = max(measured, key=lambda m: m.value)
        return Metric(top.value, top.method)
    if metrics:
        return metrics[0]
    where = f"no {phase} memory record" if phase else "no memory record"
    return Metric.missing(name, f"{where} (status {result.status})")


def latency_value(result: CaseResult, name: str) -> float | None:
    if name in ("load_s", "first_call_s", "time_to_first_image_s"):
        return getattr(result.latency, name) if result.latency else None
    if name == "s_per_step":
        return result.s_per_step
    if name in ("s_per_call", "s_per_image", "images_per_hour", "images_per_hour_per_gpu"):
        return getattr(result, name)
    return result.stage_median(name.removesuffix("_s"))


def energy_value(result: CaseResult) -> float | None:
    """The median GPU energy of a timed call shared by its images, over every GPU of the case."""
    samples = result.energy.per_image_j if result.energy else []
    return statistics.median(samples) / result.batch_size if samples else None


def drift_value(result: CaseResult, name: str) -> Metric | None:
    return result.drift.metrics.get(name) if result.drift else None


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("gpu_allocated_peak_gib", "peak VRAM allocator GiB", "GiB", "memory", gate={},
               column="vram_allocated_gib"),
    MetricSpec("gpu_reserved_peak_gib", "peak VRAM reserved GiB", "GiB", "memory", gate={},
               column="vram_reserved_gib"),
    MetricSpec("gpu_device_peak_gib", "peak VRAM device GiB", "GiB", "memory", gate={}, column="vram_device_gib"),
    MetricSpec("host_rss_peak_gib", "peak RAM (RSS) GiB", "GiB", "memory", gate={"floor_gib": 0.5}, column="ram_gib",
               host_bound=True),
    MetricSpec("host_anon_peak_gib", "peak RAM anonymous GiB", "GiB", "memory", in_table=False),
    MetricSpec("host_file_peak_gib", "peak RAM file-backed GiB", "GiB", "memory", in_table=False),
    MetricSpec("host_pinned_peak_gib", "peak pinned host memory GiB", "GiB", "memory", in_table=False),
    MetricSpec("host_shared_peak_gib", "peak RAM shared (pinned) GiB", "GiB", "memory", optional=True),
    MetricSpec("major_faults", "major page faults", "", "memory", "{:.0f}", in_table=False),
    MetricSpec("disk_read_gib", "disk read GiB", "GiB", "memory", optional=True),
    MetricSpec("load_s", "load s", "s", "latency", gate={}, host_bound=True),
    MetricSpec("s_per_step", "s/step", "s", "latency", "{:.3f}", gate={}),
    # s/image holds the pipeline's host-side work (latent set-up, image conversion) beside the GPU stages: same-code
    # reruns of scenarios/ci.yaml on one H100 differed by up to 6.2% in its median, s/step by 1.0%
    # (reports/gate-ci-klein4b-h100-20261126).
    MetricSpec("s_per_image", "s/image", "s", "latency", gate={"threshold": 0.10}),
    # A pipeline call makes batch_size images: s/image is the call shared by its images, s/call the wait for one.
    MetricSpec("s_per_call", "s/call", "s", "latency", in_table=False),
    MetricSpec("images_per_hour_per_gpu", "images/h per GPU", "images/h", "latency", "{:.0f}", lower_is_better=False,
               optional=True),  # shown where it tells more than s/image: batches, or cases over several GPUs
    MetricSpec("images_per_hour", "images/h (all GPUs of the case)", "images/h", "latency", "{:.0f}",
               lower_is_better=False, in_table=False),
    MetricSpec("first_call_s", "first call s (compilation)", "s", "latency", optional=True),
    MetricSpec("time_to_first_image_s", "time to first image s", "s", "latency", optional=True),
    MetricSpec("energy_j", "GPU energy J/image", "J", "energy", "{:.0f}", optional=True),
    MetricSpec("text_encoding_s", "text encoding s", "s", "stage", "{:.3f}"),
    MetricSpec("reference_encoding_s", "reference encoding s", "s", "stage", "{:.3f}"),
    MetricSpec("denoise_s", "denoise s", "s", "stage", "{:.3f}"),
    MetricSpec("vae_decode_s", "VAE decode s", "s", "stage", "{:.3f}"),
    MetricSpec("psnr", "PSNR dB", "dB", "drift", lower_is_better=False, gate={"max_drop": 1.0}),
    MetricSpec("ssim", "SSIM", "", "drift", "{:.4f}", lower_is_better=False, gate={"max_drop": 0.01}),
    MetricSpec("ms_ssim", "MS-SSIM", "", "drift", "{:.4f}", lower_is_better=False),
    MetricSpec("mae", "MAE (0..255)", "", "drift", "{:.3f}"),
    MetricSpec("lpips", "LPIPS", "", "drift", "{:.4f}"),
    MetricSpec("latent_cosine", "latent cosine", "", "drift", "{:.6f}", lower_is_better=False),
    MetricSpec("latent_rel_l2", "latent rel. L2", "", "drift", "{:.4g}"),
)
BY_NAME = {spec.name: spec for spec in METRICS}


def of_kind(*kinds: Kind) -> tuple[MetricSpec, ...]:
    return tuple(spec for spec in METRICS if spec.kind in kinds)


def gated(kind: Kind) -> tuple[MetricSpec, ...]:
    """The metrics of ``kind`` the regression gate checks, in registry order."""
    return tuple(spec for spec in METRICS if spec.kind == kind and spec.gate is not None)
