"""The metric registry: every number a report, the gate, the export and the CLI read from a record, declared once.

A ``MetricSpec`` names a metric, says how to read it from a ``CaseResult``, its unit, which direction is better,
how a table formats it and whether the gate checks it by default. Report columns, the gate's findings, the
export's fields and the CLI's one-line summary are all driven by ``METRICS`` and the readings below.

Memory is read one way: the peak of one phase (``peak(result, name, "load")`` or ``"inference"``), each phase
a named field. "The larger of the two phases" is its own named reading (``larger_peak``), and ``vram_needed`` (the
device-level peak, else the allocator's reserved peak, the larger of the two phases) is what fits-on decides by.
Timings are read one way: each latency metric names the raw samples it is the median of. A derived figure (the
harness's overhead, FLOPs per step, achieved TFLOP/s, the fraction of the card's dense peak) names the one function
that computes it from the record, with its method or why it is missing (``MetricSpec.derive``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

from flux2bench import flops, overhead
from flux2bench.axes import precision, registry
from flux2bench.drift_metrics import BY_NAME as DRIFT
from flux2bench.gpu_specs import dense_peak
from flux2bench.results import IMAGE, STAGES, CaseResult, Metric
from flux2bench.trackers.compilation import AUTOTUNE_TIMER_ENDINGS, COMPILE_TIMER, TIMERS_KEPT, TUNING_TIMER

Kind = Literal["memory", "latency", "stage", "energy", "drift", "derived"]
Phase = Literal["load", "inference"]
PHASES: tuple[Phase, ...] = ("load", "inference")
GATE_PHASE: Phase = "inference"  # the gate compares the peaks of the phase a code change moves: inference
LARGER = "larger of load and inference"
VRAM_NEEDED = f"device-level peak VRAM, else the allocator's reserved peak; {LARGER}"
__all__ = ["STAGES"]  # re-exported: the record's stage names live with the record


def _load_samples(result: CaseResult) -> list[float]:
    return [result.latency.load_s] if result.latency and result.latency.load_s is not None else []


def _step_samples(result: CaseResult) -> list[float]:
    return result.step_samples


def _one(name: str) -> Callable[[CaseResult], list[float]]:
    def samples(result: CaseResult) -> list[float]:
        value = getattr(result.latency, name) if result.latency else None
        return [] if value is None else [value]
    return samples


def _stage(stage: str) -> Callable[[CaseResult], list[float]]:
    def samples(result: CaseResult) -> list[float]:
        return list((result.latency.stages.get(stage) if result.latency else None) or [])
    return samples


def _per_image(result: CaseResult) -> list[float]:
    """Each timed pipeline call's time shared by its ``batch_size`` images (the call itself at batch 1)."""
    return [s / result.batch_size for s in _stage(IMAGE)(result)]


def _energy_samples(result: CaseResult) -> list[float]:
    """GPU energy of each timed pipeline call shared by its images, over every GPU of the case."""
    return [j / result.batch_size for j in result.energy.per_image_j] if result.energy else []


@dataclass(frozen=True)
class MetricSpec:
    name: str  # the record's name: a PhaseMemory field, a latency figure, a stage or a drift metric
    header: str  # table header
    unit: str
    kind: Kind
    fmt: str = "{:.2f}"
    lower_is_better: bool = True
    gate: dict[str, Any] | None = None  # checked by the regression gate, with these rule defaults; None: not gated
    column: str = ""  # the report's column name (default: name); a memory metric has one column per phase
    in_table: bool = True  # a column of the report's results table
    host_bound: bool = False  # depends on the host (CPU, RAM, PCIe) whatever the case; see also axes' host_bound
    optional: bool = False  # a report column only where some record has it (records of earlier versions do not)
    samples: Callable[[CaseResult], list[float]] | None = None  # timings and energy: the raw samples, one per ...
    missing: str = ""  # timings and energy: why a case that ran has no samples
    short: str = ""  # a memory metric's header under the HTML table's "memory: peak GiB per phase" group
    derive: Callable[[CaseResult], Metric] | None = None  # a derived figure: computed from several parts of a record
    # A rate derived from the median of the samples (images per hour from s/image), exactly, not a median of rates.
    of_median: Callable[[CaseResult, float], float] | None = None
    cpu_header: str = ""  # the header in a report of a run no case of which ran on a GPU, where it differs

    def text(self, value: float) -> str:
        """The value as tables show it (see ``formatted``)."""
        return formatted(value, self.fmt)

    @property
    def column_name(self) -> str:
        return self.column or self.name

    def phase_column(self, phase: Phase) -> str:
        """A memory metric's report column for one phase."""
        stem = self.column_name.removesuffix("_gib")
        return f"{stem}_{phase}" + ("_gib" if stem != self.column_name else "")

    def phase_header(self, phase: Phase, short: bool = False) -> str:
        return f"{self.short if short and self.short else self.header} ({phase})"

    def value(self, result: CaseResult) -> float | None:
        """A timing's or energy's median over its samples; a derived figure's value."""
        if self.derive is not None:
            return self.derive(result).value
        samples = self.samples(result) if self.samples else []
        if not samples:
            return None
        median = statistics.median(samples)
        return self.of_median(result, median) if self.of_median else median


def formatted(value: Any, fmt: str) -> str:
    """``fmt.format(value)``, except that a number other than zero never reads as zero: a value its format rounds to
    zero (a tiny model's TFLOP/s, a few MiB of a GiB column) gets two significant digits instead."""
    text = fmt.format(value)
    if isinstance(value, (int, float)) and value and math.isfinite(value):
        try:
            shown = float(text)
        except ValueError:
            return text
        if shown == 0:
            return f"{value:.2g}"
    return text


def ran_on_gpu(results: Iterable[CaseResult]) -> bool:
    """Whether any case of a run names the GPU it ran on or measured GPU memory: else the run is a CPU run, and its
    report speaks of the CPU and host RAM, not of cards."""
    return any(r.setup.gpu or vram_needed(r)[0] is not None for r in results)


def peak(result: CaseResult, name: str, phase: Phase) -> Metric:
    """A memory metric's peak over one phase of the case."""
    memory = result.memory.get(phase)
    if memory is None:
        return Metric.missing(name, f"no {phase} memory record (status {result.status})")
    reading: Metric = getattr(memory, name)
    return reading


def larger_peak(result: CaseResult, name: str) -> Metric:
    """A memory metric's higher value of the load and inference phases (what a card must hold at every moment)."""
    metrics = [getattr(memory, name) for phase, memory in result.memory.items() if phase in PHASES]
    measured = [m for m in metrics if m.value is not None]
    if measured:
        top = max(measured, key=lambda m: m.value)
        return Metric(top.value, top.method)
    return metrics[0] if metrics else Metric.missing(name, f"no memory record (status {result.status})")


def vram_needed(result: CaseResult) -> tuple[float | None, str]:
    """The GPU memory a case needs, for fit decisions: its device-level peak, else the allocator's reserved peak,
    the larger of load and inference; and which it is."""
    device = larger_peak(result, "gpu_device_peak_gib")
    if device.value is not None:
        return device.value, "device peak"
    reserved = larger_peak(result, "gpu_reserved_peak_gib")
    if reserved.value is not None:
        return reserved.value, "reserved peak (no device-level measurement)"
    return None, f"no GPU peak: {device.reason}"


def host_ram_needed(result: CaseResult) -> float | None:
    """The host RAM a case needs: its RSS peak, the larger of load and inference."""
    return larger_peak(result, "host_rss_peak_gib").value


def s_per_step(result: CaseResult) -> float | None:
    return BY_NAME["s_per_step"].value(result)


def s_per_call(result: CaseResult) -> float | None:
    """The median pipeline call: the wait for an image, however many images the call makes."""
    return BY_NAME["s_per_call"].value(result)


def by_call_time(result: CaseResult) -> float:
    """A sort key: the fastest setup is the shortest wait for an image (s/call); a record without timed calls last."""
    call = s_per_call(result)
    return math.inf if call is None else call


def s_per_image(result: CaseResult) -> float | None:
    """The median of each call's time shared by its images (the call itself at batch 1)."""
    return BY_NAME["s_per_image"].value(result)


def stage_s(result: CaseResult, stage: str) -> float | None:
    """The median time of one stage of the pipeline call (``STAGES``)."""
    return BY_NAME[f"{stage}_s"].value(result)


def achieved_tflops(result: CaseResult) -> Metric:
    """TFLOP/s of the denoising steps: FLOPs per step over the median s/step, summed over the case's GPUs."""
    step = flops.step_flops(result)
    if step.value is None:
        return step
    seconds = s_per_step(result)
    if not seconds:
        return Metric.missing(flops.METHOD, "no per-step timings recorded")
    return Metric(step.value / seconds / 1e12, f"{flops.METHOD}, over the median s/step")


def peak_fraction(result: CaseResult) -> Metric:
    """Achieved TFLOP/s over the dense peak of the case's GPUs for the precision its transformer multiplies in."""
    achieved = achieved_tflops(result)
    if achieved.value is None:
        return achieved
    peak, source = dense_peak(result.setup.gpu, precision.AXIS.of(result.case).precision)
    if peak is None:
        return Metric.missing(achieved.method, source)
    gpus = registry.gpus(result.case)
    return Metric(achieved.value / (peak * gpus), f"achieved TFLOP/s / ({gpus} x {peak:g} dense TFLOP/s, {source})")


def images_per_hour_per_gpu(result: CaseResult) -> float | None:
    return BY_NAME["images_per_hour_per_gpu"].value(result)


def usd_per_1000_images(result: CaseResult, usd_per_gpu_hour: float) -> float | None:
    """What 1000 images cost at a price per GPU-hour: every GPU of a parallel case is paid for, each call's time
    shared by its images (from the median s/image)."""
    per_hour = images_per_hour_per_gpu(result)
    return None if not per_hour else 1000 / per_hour * usd_per_gpu_hour


def spread(samples: list[float]) -> float:
    """The run's own noise: the interquartile range of its samples relative to their median (one outlier barely
    moves it)."""
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(samples)


def case_host_bound(result: CaseResult) -> bool:
    """Whether the case's timings depend on the host: it ran on the CPU, or an axis (offload) makes it so."""
    return result.setup.device == "cpu" or registry.host_bound(result.case)


def worker_start(result: CaseResult) -> str:
    """How the case's worker started; records from before it was recorded had fresh workers."""
    return (result.wall_split.worker_start if result.wall_split else None) or "fresh"


def drift_value(result: CaseResult, name: str) -> Metric | None:
    return result.drift.metrics.get(name) if result.drift else None


def _overhead(result: CaseResult) -> Metric:
    value = overhead.gpu_s_per_timed_s(result)
    reason = None if value is not None else (
        "no wall-time split (a record of an earlier version, or a worker that wrote no record)"
        if result.wall_split is None else f"no timed images (status {result.status})")
    return Metric(value, overhead.METHOD, reason)


def _compile_timer(timer: str, endings: tuple[str, ...] = ()) -> Callable[[CaseResult], Metric]:
    """One of torch's compile timers over a compiled case's measured calls (``setup.compile.events``): a part of its
    first call. With ``endings``, the sum of every timer whose name ends with one of them (``timer`` says what)."""
    names = f"'{timer}'" if not endings else " + ".join(f"'*{ending}'" for ending in endings) + f" ({timer})"
    method = f"torch's compilation_time_metrics[{names}] over the measured calls (setup.compile.events)"

    def read(result: CaseResult) -> Metric:
        compiled = result.setup.axes.get("compile")
        if not compiled:
            return Metric.missing(method, "nothing compiled")
        if not (events := compiled.get("events")):
            return Metric.missing(method, "not recorded by this version")
        if timer == COMPILE_TIMER:
            seconds = events.get("compile_s")
        elif "timers_s" not in events:
            return Metric.missing(method, "not recorded by this version")
        elif endings:
            found = [s for name, s in events["timers_s"].items() if name.endswith(endings)]
            if not found and "max-autotune" not in (mode := str(compiled.get("mode", "default"))):
                return Metric.missing(method, f"compile mode {mode} benchmarks no candidate kernels")
            if not found:
                return Metric.missing(method, f"not among the {TIMERS_KEPT} largest compile timers kept")
            seconds = sum(found) if all(_is_duration(s) for s in found) else found
        elif (seconds := events["timers_s"].get(timer)) is None:
            return Metric.missing(method, f"not among the {TIMERS_KEPT} largest compile timers kept")
        if not _is_duration(seconds):
            return Metric.missing(method, f"not a duration in the record: {seconds!r}")
        return Metric(float(seconds), method)
    return read


def _is_duration(seconds: Any) -> bool:
    is_number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
    return is_number and math.isfinite(seconds) and seconds >= 0


def _scaled(reading: Callable[[CaseResult], Metric], factor: float) -> Callable[[CaseResult], Metric]:
    def scaled(result: CaseResult) -> Metric:
        metric = reading(result)
        return Metric(metric.value * factor if metric.value is not None else None, metric.method, metric.reason)
    return scaled


STAGE_HEADERS = {"text_encoding": "text encoding", "reference_encoding": "reference encoding", "denoise": "denoise",
                 "vae_decode": "VAE decode"}
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("gpu_allocated_peak_gib", "peak VRAM allocator GiB", "GiB", "memory", gate={},
               column="vram_allocated_gib", short="VRAM allocated"),
    MetricSpec("gpu_reserved_peak_gib", "peak VRAM reserved GiB", "GiB", "memory", gate={},
               column="vram_reserved_gib", short="VRAM reserved"),
    MetricSpec("gpu_device_peak_gib", "peak VRAM device GiB", "GiB", "memory", gate={}, column="vram_device_gib",
               short="VRAM device"),
    MetricSpec("host_rss_peak_gib", "peak RAM (RSS) GiB", "GiB", "memory", gate={"floor_gib": 0.5}, column="ram_gib",
               host_bound=True, short="RAM (RSS)"),
    MetricSpec("host_anon_peak_gib", "peak RAM anonymous GiB", "GiB", "memory", in_table=False),
    MetricSpec("host_file_peak_gib", "peak RAM file-backed GiB", "GiB", "memory", in_table=False),
    MetricSpec("host_pinned_peak_gib", "peak pinned host memory GiB", "GiB", "memory", in_table=False),
    MetricSpec("host_shared_peak_gib", "peak RAM shared (pinned) GiB", "GiB", "memory", optional=True,
               short="RAM shared (pinned)"),
    MetricSpec("major_faults", "major page faults", "", "memory", "{:.0f}", in_table=False),
    MetricSpec("disk_read_gib", "disk read GiB", "GiB", "memory", optional=True, short="disk read"),
    MetricSpec("load_s", "load s", "s", "latency", gate={}, host_bound=True, samples=_load_samples,
               missing="load time not recorded"),
    MetricSpec("s_per_step", "s/step", "s", "latency", "{:.3f}", gate={}, samples=_step_samples,
               missing="no per-step timings recorded"),
    # s/image holds the pipeline's host-side work (latent set-up, image conversion) beside the GPU stages: same-code
    # reruns of scenarios/ci.yaml on one H100 differed by up to 6.2% in its median, s/step by 1.0%
    # (reports/gate-ci-klein4b-h100-20261126).
    MetricSpec("s_per_image", "s/image", "s", "latency", gate={"threshold": 0.10}, samples=_per_image,
               missing="no end-to-end timings recorded"),
    # A pipeline call makes batch_size images: s/image is the call shared by its images, s/call the wait for one.
    MetricSpec("s_per_call", "s/call", "s", "latency", in_table=False, samples=_stage(IMAGE),
               missing="no end-to-end timings recorded"),
    # Shown where it tells more than s/image: batches, or cases over several GPUs.
    MetricSpec("images_per_hour_per_gpu", "images/h per GPU", "images/h", "latency", "{:.0f}", lower_is_better=False,
               optional=True, samples=_per_image, of_median=lambda r, s: 3600 / s / registry.gpus(r.case),
               missing="no end-to-end timings recorded", cpu_header="images/h"),
    MetricSpec("images_per_hour", "images/h (all GPUs of the case)", "images/h", "latency", "{:.0f}",
               lower_is_better=False, in_table=False, samples=_per_image, of_median=lambda r, s: 3600 / s,
               missing="no end-to-end timings recorded"),
    MetricSpec("first_call_s", "first call s (compilation)", "s", "latency", optional=True,
               samples=_one("first_call_s"), missing="not recorded by this version"),
    # Where a compiled case's first call went: dynamo's and inductor's compilation, and the tuning of each Triton
    # kernel at its first launch (torchao's FP8 turns coordinate descent tuning on; it held 87% of an FP8 first call).
    MetricSpec("compile_timer_s", "of which compiling s", "s", "latency", optional=True,
               derive=_compile_timer(COMPILE_TIMER)),
    MetricSpec("tuning_timer_s", "of which coordinate descent tuning s", "s", "latency", optional=True,
               derive=_compile_timer(TUNING_TIMER)),
    # max-autotune's choice among candidate kernels for each matrix product (FP8 on an H200: up to 81 s a shape)
    MetricSpec("autotune_timer_s", "of which max-autotune kernel choice s", "s", "latency", optional=True,
               derive=_compile_timer("max-autotune's kernel choice", AUTOTUNE_TIMER_ENDINGS)),
    MetricSpec("time_to_first_image_s", "time to first image s", "s", "latency", optional=True,
               samples=_one("time_to_first_image_s"), missing="not recorded by this version"),
    MetricSpec("energy_j", "GPU energy J/image", "J", "energy", "{:.0f}", optional=True, samples=_energy_samples,
               missing="no energy recorded"),
    *(MetricSpec(f"{stage}_s", f"{STAGE_HEADERS[stage]} s", "s", "stage", "{:.3f}", samples=_stage(stage),
                 missing=f"no {stage} timings recorded") for stage in STAGES),
    # The harness's cost: wall time the case held its GPUs (artifact workers, process start, imports, CUDA, load,
    # compilation, warm-up, timed images, exit) per second of timed images.
    MetricSpec("gpu_s_per_timed_s", "GPU-s held per timed GPU-s", "", "derived", "{:.1f}", optional=True,
               derive=_overhead, cpu_header="s held per timed s"),
    # Compute: matrix-product FLOPs of a step (flux2bench.flops) over the median s/step, and that over the card's
    # dense peak for the precision (flux2bench.gpu_specs).
    MetricSpec("step_tflop", "TFLOP/step", "TFLOP", "derived", "{:.3g}", optional=True,
               derive=_scaled(flops.step_flops, 1e-12)),
    MetricSpec("achieved_tflops", "TFLOP/s", "TFLOP/s", "derived", "{:.0f}", lower_is_better=False, optional=True,
               derive=achieved_tflops),
    MetricSpec("peak_fraction_pct", "% of dense peak", "%", "derived", "{:.0f}", lower_is_better=False,
               optional=True, derive=_scaled(peak_fraction, 100)),
    *(MetricSpec(name, header, unit, "drift", fmt, lower_is_better=not DRIFT[name].higher_is_better, gate=gate)
      for name, header, unit, fmt, gate in (
          ("psnr", "PSNR dB", "dB", "{:.2f}", {"max_drop": 1.0}), ("ssim", "SSIM", "", "{:.4f}", {"max_drop": 0.01}),
          ("ms_ssim", "MS-SSIM", "", "{:.4f}", None), ("mae", "MAE (0..255)", "", "{:.3f}", None),
          ("lpips", "LPIPS", "", "{:.4f}", None), ("latent_cosine", "latent cosine", "", "{:.6f}", None),
          ("latent_rel_l2", "latent rel. L2", "", "{:.4g}", None))),
)
BY_NAME = {spec.name: spec for spec in METRICS}
PSNR, SSIM = BY_NAME["psnr"].name, BY_NAME["ssim"].name  # the drift figures one-line summaries quote


def of_kind(*kinds: Kind) -> tuple[MetricSpec, ...]:
    return tuple(spec for spec in METRICS if spec.kind in kinds)


def gated(kind: Kind) -> tuple[MetricSpec, ...]:
    """The metrics of ``kind`` the regression gate checks, in registry order."""
    return tuple(spec for spec in METRICS if spec.kind == kind and spec.gate is not None)
