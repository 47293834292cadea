"""The report of a run directory: report.md, report.csv, report.html and plots/*.png.

One function (``results_frame``) turns the records into a DataFrame, the single source of every
table; ``fits_on`` answers "which setup for which card"; the plots read the records directly.
A value that was not measured stays None in the frame and renders as "n/a" with its reason (a
footnote in Markdown, a ``notes`` column in CSV, a title attribute in HTML), never as 0.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from flux2bench.drift import METRIC_NAMES, PRETRAINED_LABEL, PSNR_CAP_DB, SYNTHETIC_LABEL, needs_drift
from flux2bench.results import CaseResult, Metric, RunStore

GIB = 2**30
GB = 1e9  # card sizes are sold in GB, measurements are in GiB
GPU_SIZES_GB = (8, 12, 16, 24, 32, 48, 80, 96, 141)
HOST_RAM_GB = (16, 32, 64, 128, 256, 512)
STAGES = ("text_encoding", "reference_encoding", "denoise", "vae_decode")
FINISHED = ("ok", "drift_fail")  # statuses whose measurements describe a working setup
NOTHING_FITS = "nothing measured fits"
FITS_NOTE = ("Card sizes are GB (10^9 bytes); measured peaks are GiB (2^30 bytes). A setup fits when its peak "
             "(device-level, else reserved) or the emulated cap it ran ok under is at most the card's size, unless "
             "it ran out of memory under an emulated cap at least that large.")
THUMBNAIL_PX = 192
GRID_MAX_ROWS = 4


def gb_to_gib(gb: float) -> float:
    return gb * GB / GIB


@dataclass(frozen=True)
class Column:
    name: str
    header: str
    fmt: str = "{}"
    drift: bool = False  # its header carries the run's drift label


COLUMNS = (
    Column("number", "#"),
    Column("block", "block"),
    Column("label", "case"),
    Column("status", "status"),
    Column("cap_gib", "GPU cap GiB", "{:g}"),
    Column("vram_allocated_gib", "peak VRAM allocator GiB", "{:.2f}"),
    Column("vram_reserved_gib", "peak VRAM reserved GiB", "{:.2f}"),
    Column("vram_device_gib", "peak VRAM device GiB", "{:.2f}"),
    Column("ram_gib", "peak RAM (RSS) GiB", "{:.2f}"),
    Column("load_s", "load s", "{:.2f}"),
    Column("s_per_step", "s/step", "{:.3f}"),
    Column("s_per_image", "s/image", "{:.2f}"),
    Column("text_encoding_s", "text encoding s", "{:.3f}"),
    Column("reference_encoding_s", "reference encoding s", "{:.3f}"),
    Column("denoise_s", "denoise s", "{:.3f}"),
    Column("vae_decode_s", "VAE decode s", "{:.3f}"),
    Column("psnr", "PSNR dB", "{:.2f}", drift=True),
    Column("ssim", "SSIM", "{:.4f}", drift=True),
    Column("ms_ssim", "MS-SSIM", "{:.4f}", drift=True),
    Column("mae", "MAE (0..255)", "{:.3f}", drift=True),
    Column("lpips", "LPIPS", "{:.4f}", drift=True),
    Column("latent_cosine", "latent cosine", "{:.6f}", drift=True),
    Column("latent_rel_l2", "latent rel. L2", "{:.4g}", drift=True),
    Column("drift_failed", "drift thresholds broken", drift=True),
)
COLUMN = {c.name: c for c in COLUMNS}
# Columns whose change against another run is shown with --baseline: the numeric ones, less the cap (a setting).
MEASURED = tuple(c.name for c in COLUMNS if c.fmt != "{}" and c.name != "cap_gib")


def drift_heading(results: Iterable[CaseResult]) -> str:
    """The label every drift header carries; synthetic wins so that no synthetic number passes for quality."""
    return SYNTHETIC_LABEL if any(r.weights == "synthetic" for r in results) else PRETRAINED_LABEL


def header(column: Column, heading: str) -> str:
    return f"{column.header} ({heading})" if column.drift else column.header


# --- records -> frame ----------------------------------------------------------------------------

def case_peak(result: CaseResult, metric: str) -> Metric:
    """The highest value of a memory metric over the load and inference phases."""
    metrics = [getattr(phase, metric) for phase in result.memory.values()]
    measured = [m for m in metrics if m.value is not None]
    if measured:
        top = max(measured, key=lambda m: m.value)
        return Metric(top.value, top.method)
    if metrics:
        return metrics[0]
    return Metric.missing(metric, f"no memory record (status {result.status})")


def gpu_peak(result: CaseResult) -> tuple[float | None, str]:
    """The case's GPU peak for fit decisions: device-level, else the allocator's reserved peak; and which it is."""
    device = case_peak(result, "gpu_device_peak_gib")
    if device.value is not None:
        return device.value, "device peak"
    reserved = case_peak(result, "gpu_reserved_peak_gib")
    if reserved.value is not None:
        return reserved.value, "reserved peak (no device-level measurement)"
    return None, f"no GPU peak: {device.reason}"


def _cell(value: Any, missing: str | None) -> tuple[Any, str | None]:
    return value, missing if value is None else None


def _metric_cell(metric: Metric) -> tuple[Any, str | None]:
    return _cell(metric.value, metric.reason)


def _timing_cell(value: float | None, result: CaseResult, missing: str) -> tuple[Any, str | None]:
    return _cell(value, f"case ended with status {result.status}" if result.status not in FINISHED else missing)


def _no_drift_reason(result: CaseResult) -> str:
    if not needs_drift(result.case):
        return "this case is the bf16 baseline"
    if result.status not in FINISHED:
        return f"case ended with status {result.status}"
    return "no drift recorded (no finished baseline)"


def _drift_cells(result: CaseResult) -> dict[str, tuple[Any, str | None]]:
    if result.drift is None:
        reason = _no_drift_reason(result)
        return {name: (None, reason) for name in (*METRIC_NAMES, "drift_failed")}
    cells = {name: _metric_cell(result.drift.metrics.get(name) or Metric.missing(name, "not computed"))
             for name in METRIC_NAMES}
    cells["drift_failed"] = (", ".join(result.drift.failed) or "none", None)
    return cells


def _latency_cells(result: CaseResult) -> dict[str, tuple[Any, str | None]]:
    load_s = result.latency.load_s if result.latency else None
    cells = {
        "load_s": _timing_cell(load_s, result, "load time not recorded"),
        "s_per_step": _timing_cell(result.s_per_step, result, "no per-step timings recorded"),
        "s_per_image": _timing_cell(result.s_per_image, result, "no end-to-end timings recorded"),
    }
    for stage in STAGES:
        missing = "no reference images" if stage == "reference_encoding" and not result.case.get(
            "reference_images") else f"no {stage} timings recorded"
        cells[f"{stage}_s"] = _timing_cell(result.stage_median(stage), result, missing)
    return cells


def _cells(number: int, result: CaseResult) -> dict[str, tuple[Any, str | None]]:
    """Every column of one row as (value, why the value is missing, or the status's reason)."""
    return {
        "number": (number, None),
        "block": (result.block, None),
        "label": (result.label, None),
        "status": (result.status, result.reason or result.error),
        "cap_gib": _cell(result.case.get("max_vram_gib"), "no emulated cap"),
        "vram_allocated_gib": _metric_cell(case_peak(result, "gpu_allocated_peak_gib")),
        "vram_reserved_gib": _metric_cell(case_peak(result, "gpu_reserved_peak_gib")),
        "vram_device_gib": _metric_cell(case_peak(result, "gpu_device_peak_gib")),
        "ram_gib": _metric_cell(case_peak(result, "host_rss_peak_gib")),
        **_latency_cells(result),
        **_drift_cells(result),
    }


def _grouped_by_block(results: list[CaseResult]) -> list[CaseResult]:
    first_seen = {}
    for r in results:
        first_seen.setdefault(r.block, len(first_seen))
    return sorted(results, key=lambda r: first_seen[r.block])


def results_frame(results: list[CaseResult]) -> pd.DataFrame:
    """One row per case, indexed by case key, grouped by block; ``attrs["reasons"]`` maps (key, column) to a reason."""
    rows, reasons = [], {}
    for number, result in enumerate(_grouped_by_block(results), 1):
        cells = _cells(number, result)
        rows.append({"key": result.key, **{name: value for name, (value, _) in cells.items()}})
        reasons |= {(result.key, name): reason for name, (_, reason) in cells.items() if reason}
    frame = pd.DataFrame(rows, columns=["key", *COLUMN]).set_index("key")
    frame.attrs["reasons"] = reasons
    return frame


def with_changes(frame: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """The frame plus, for cases present in both runs, ``<column>_change_pct`` and ``status_before`` columns."""
    frame = frame.copy()
    for name in MEASURED:
        now = pd.to_numeric(frame[name], errors="coerce")
        before = pd.to_numeric(other[name].reindex(frame.index), errors="coerce")
        frame[f"{name}_change_pct"] = ((now - before) / before * 100).replace([np.inf, -np.inf], np.nan)
    frame["status_before"] = other["status"].reindex(frame.index)
    return frame


# --- fits on -------------------------------------------------------------------------------------

def _workload(case: dict[str, Any]) -> str:
    refs = f", {case['reference_images']} reference images" if case["reference_images"] else ""
    return f"{case['model']} ({case['weights']} weights), {case['width']}x{case['height']}, {case['steps']} steps{refs}"


_NOT_SETUP = {"key", "block", "max_vram_gib", "timeout_s", "repeats", "warmup"}


def _setup(case: dict[str, Any]) -> str:
    """What a case runs, whatever cap it ran under: an OOM under one cap speaks for the same setup under others."""
    return json.dumps({k: v for k, v in case.items() if k not in _NOT_SETUP}, sort_keys=True)


def _oom_caps(results: list[CaseResult]) -> dict[str, float]:
    """Per setup, the largest emulated cap (GiB) it ran out of memory under: it needs more than that."""
    caps: dict[str, float] = {}
    for r in results:
        cap = r.case.get("max_vram_gib")
        if r.status == "oom" and cap is not None:
            caps[_setup(r.case)] = max(cap, caps.get(_setup(r.case), 0.0))
    return caps


def _gpu_fit(result: CaseResult, size_gb: float, oom_caps: dict[str, float]) -> str | None:
    """Why the finished case fits a card of ``size_gb``, or None when it does not (or nothing says it does)."""
    size_gib = gb_to_gib(size_gb)
    if oom_caps.get(_setup(result.case), -1.0) >= size_gib:
        return None
    peak, basis = gpu_peak(result)
    if peak is not None and peak <= size_gib:
        return f"{basis} {peak:.2f} GiB <= {size_gib:.2f} GiB"
    cap = result.case.get("max_vram_gib")
    if cap is not None and cap <= size_gib:
        return f"ran ok under an emulated cap of {cap:g} GiB <= {size_gib:.2f} GiB"
    return None


def _ram_fit(result: CaseResult, size_gb: float) -> str | None:
    rss = case_peak(result, "host_rss_peak_gib").value
    size_gib = gb_to_gib(size_gb)
    return f"RSS peak {rss:.2f} GiB <= {size_gib:.2f} GiB" if rss is not None and rss <= size_gib else None


def _drift_summary(result: CaseResult) -> str:
    if result.drift is None:
        return _no_drift_reason(result)
    psnr = result.drift.metrics.get("psnr")
    text = f"PSNR {psnr.value:.2f} dB" if psnr and psnr.value is not None else "PSNR n/a"
    return text + (f"; breaks {', '.join(result.drift.failed)}" if result.drift.failed else "")


def cost_column(name: str) -> str:
    return f"usd_per_1000_images_{name}"


def _fits_row(resource: str, workload: str, size_gb: float, fitting: list[tuple[CaseResult, str]],
              prices: dict[str, float]) -> dict[str, Any]:
    row = {"resource": resource, "workload": workload, "size_gb": size_gb, "size_gib": gb_to_gib(size_gb)}
    if not fitting:
        return row | {"setup": NOTHING_FITS, "key": None, "s_per_image": None, "drift": None, "basis": None}
    best, basis = min(fitting, key=lambda pair: pair[0].s_per_image)
    row |= {"setup": best.label, "key": best.key, "s_per_image": best.s_per_image,
            "drift": _drift_summary(best), "basis": basis}
    return row | {cost_column(name): best.s_per_image * 1000 / 3600 * usd for name, usd in prices.items()}


def fits_on(results: list[CaseResult], gpu_sizes_gb: Iterable[float] = GPU_SIZES_GB,
            host_ram_gb: Iterable[float] = HOST_RAM_GB, prices: dict[str, float] | None = None) -> pd.DataFrame:
    """Per workload and memory size, the fastest finished setup that fits, from measured peaks, caps and OOMs."""
    prices = prices or {}
    by_workload: dict[str, list[CaseResult]] = {}
    for r in results:
        by_workload.setdefault(_workload(r.case), []).append(r)
    rows = []
    for workload, group in by_workload.items():
        oom_caps = _oom_caps(group)
        finished = [r for r in group if r.status in FINISHED and r.s_per_image is not None]
        for size in gpu_sizes_gb:
            fitting = [(r, basis) for r in finished if (basis := _gpu_fit(r, size, oom_caps))]
            rows.append(_fits_row("GPU", workload, size, fitting, prices))
        for size in host_ram_gb:
            fitting = [(r, basis) for r in finished if (basis := _ram_fit(r, size))]
            rows.append(_fits_row("host RAM", workload, size, fitting, prices))
    columns = ["resource", "workload", "size_gb", "size_gib", "setup", "key", "s_per_image", "drift", "basis",
               *map(cost_column, prices)]
    return pd.DataFrame(rows, columns=columns)


# --- plots ---------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (x, y) point, whether no other point is at least as good on both and better on one (lower is better)."""
    return [not any(ox <= x and oy <= y and (ox, oy) != (x, y) for ox, oy in points) for x, y in points]


def _finished(results: list[CaseResult]) -> list[CaseResult]:
    return [r for r in results if r.status in FINISHED and r.s_per_image is not None]


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _plot_pareto(results: list[CaseResult], numbers: dict[str, int], path: Path) -> str | None:
    """One Pareto front per workload: s/image across step counts or resolutions is not comparable."""
    points = [(r, *gpu_peak(r)) for r in _finished(results)]
    points = [(r, peak, basis) for r, peak, basis in points if peak is not None]
    if not points:
        return "no finished case has a GPU memory peak"
    by_workload: dict[str, list[tuple[CaseResult, float]]] = {}
    for r, peak, _ in points:
        by_workload.setdefault(_workload(r.case), []).append((r, peak))
    figure = Figure(figsize=(8, 4.5 + 0.25 * len(by_workload)))
    ax = figure.add_subplot()
    for (workload, group), colour in zip(by_workload.items(), plt_colours()):
        xy = [(r.s_per_image, peak) for r, peak in group]
        ax.scatter(*zip(*xy), color=colour, label=workload)
        front_xy = sorted(p for p, on in zip(xy, pareto_front(xy)) if on)
        ax.plot(*zip(*front_xy), "-", color=colour, alpha=0.6)
        for (r, _), (x, y) in zip(group, xy):
            ax.annotate(f"#{numbers[r.key]}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    bases = sorted({basis.split(" (")[0] for _, _, basis in points})
    ax.set(xlabel="s/image", ylabel=f"peak VRAM GiB ({', '.join(bases)})",
           title="Peak VRAM vs s/image; lines: Pareto front of each workload")
    ax.legend(fontsize=7, loc="best")
    _save(figure, path)
    return None


def plt_colours() -> list[str]:
    return [f"C{i % 10}" for i in range(100)]


def _plot_stages(results: list[CaseResult], numbers: dict[str, int], path: Path) -> str | None:
    timed = _finished(results)
    if not timed:
        return "no finished case has timings"
    figure = Figure(figsize=(8, 1.5 + 0.35 * len(timed)))
    ax = figure.add_subplot()
    names = [f"#{numbers[r.key]}" for r in timed]
    left = np.zeros(len(timed))
    for stage in STAGES:
        widths = np.array([r.stage_median(stage) or 0.0 for r in timed])
        ax.barh(names, widths, left=left, label=stage)
        left += widths
    other = np.clip(np.array([r.s_per_image for r in timed]) - left, 0, None)
    ax.barh(names, other, left=left, label="other", color="lightgray")
    ax.invert_yaxis()
    ax.set(xlabel="median seconds per image", title="Stage latency per case")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(figure, path)
    return None


_SERIES_FIELDS = ("model", "precision", "text_encoder_precision", "text_encoder", "offload", "attention",
                  "low_cpu_mem_usage", "max_vram_gib", "steps", "reference_images", "width", "height")


def _series_names(cases: list[dict[str, Any]], axis_fields: tuple[str, ...]) -> list[str]:
    """A name per case from the fields that vary among the plotted cases, the x axis's own fields left out."""
    varying = [f for f in _SERIES_FIELDS if f not in axis_fields and len({str(c[f]) for c in cases}) > 1]
    return [" ".join(f"{f}={c[f]}" for f in varying) or "all cases" for c in cases]


def _plot_scaling(results: list[CaseResult], path: Path, axis_fields: tuple[str, ...], xlabel: str,
                  x_of: Callable[[dict[str, Any]], float]) -> str | None:
    finished = _finished(results)
    series: dict[str, list[CaseResult]] = {}
    for name, r in zip(_series_names([r.case for r in finished], axis_fields), finished):
        series.setdefault(name, []).append(r)
    series = {name: members for name, members in series.items() if len({x_of(r.case) for r in members}) > 1}
    if not series:
        return f"no setup was measured at two or more values of {xlabel}"
    figure = Figure(figsize=(10, 4))
    vram_ax, step_ax = figure.subplots(1, 2)
    for name, members in series.items():
        members.sort(key=lambda r: x_of(r.case))
        xs = [x_of(r.case) for r in members]
        peaks = [gpu_peak(r)[0] for r in members]
        if any(p is not None for p in peaks):
            vram_ax.plot(xs, [np.nan if p is None else p for p in peaks], "o-", label=name)
        step_ax.plot(xs, [r.s_per_step if r.s_per_step is not None else np.nan for r in members], "o-", label=name)
    vram_ax.set(xlabel=xlabel, ylabel="peak VRAM GiB (device, else reserved)", title=f"Peak VRAM vs {xlabel}")
    if not vram_ax.lines:
        vram_ax.text(0.5, 0.5, "no GPU memory measured", ha="center", va="center", transform=vram_ax.transAxes)
    step_ax.set(xlabel=xlabel, ylabel="s/step", title=f"s/step vs {xlabel}")
    step_ax.legend(fontsize=7)
    _save(figure, path)
    return None


def _timeline_result(results: list[CaseResult], run_dir: Path, chosen: str | None) -> CaseResult | None:
    with_timeline = [r for r in results if r.timeline and (run_dir / r.timeline).is_file()]
    if chosen is not None:
        matches = [r for r in results if chosen in (r.key, r.label)]
        if not matches:
            raise ValueError(f"no case has the key or label {chosen!r}")
        return matches[0] if matches[0].key in {r.key for r in with_timeline} else None
    return max(with_timeline, default=None, key=lambda r: (gpu_peak(r)[0] or 0.0,
                                                           case_peak(r, "host_rss_peak_gib").value or 0.0))


def _plot_timeline(result: CaseResult | None, run_dir: Path, path: Path) -> str | None:
    if result is None:
        return "no timeline recorded for the chosen case"
    samples = pd.read_csv(run_dir / result.timeline)
    figure = Figure(figsize=(9, 4))
    ax = figure.add_subplot()
    for column, name in (("gpu_used_gib", "GPU used"), ("rss_gib", "RSS"), ("anon_gib", "anonymous"),
                         ("file_gib", "file-backed")):
        if samples[column].notna().any():
            ax.plot(samples["t_s"], samples[column], label=name)
    load = samples.loc[samples["phase"] == "load", "t_s"]
    if not load.empty:
        ax.axvspan(load.min(), load.max(), color="gray", alpha=0.15, label="load phase")
    ax.set(xlabel="seconds", ylabel="GiB", title=f"Memory timeline: {result.label}")
    ax.legend(fontsize=8)
    _save(figure, path)
    return None


def _speedups(results: list[CaseResult]) -> list[tuple[CaseResult, float, float]]:
    by_key = {r.key: r for r in results}
    points = []
    for r in _finished(results):
        baseline = by_key.get(r.drift.baseline_key) if r.drift else None
        psnr = r.drift.metrics.get("psnr") if r.drift else None
        if baseline and baseline.s_per_image and psnr and psnr.value is not None:
            points.append((r, baseline.s_per_image / r.s_per_image, psnr.value))
    return points


def _plot_drift(results: list[CaseResult], numbers: dict[str, int], path: Path) -> str | None:
    points = _speedups(results)
    if not points:
        return "no case has both a PSNR against its baseline and timings of that baseline"
    figure = Figure(figsize=(7, 4.5))
    ax = figure.add_subplot()
    ax.scatter([s for _, s, _ in points], [p for _, _, p in points])
    for r, speedup, psnr in points:
        ax.annotate(f"#{numbers[r.key]}", (speedup, psnr), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set(xlabel="speed-up vs baseline (baseline s/image / case s/image)",
           ylabel=f"PSNR dB ({drift_heading(results)})", title="Drift vs speed-up")
    _save(figure, path)
    return None


@dataclass
class Plots:
    paths: dict[str, Path]
    skipped: dict[str, str]  # plot name -> why it was not drawn


PLOT_TITLES = {
    "pareto": "Peak VRAM vs s/image (Pareto front)",
    "stages": "Stage latency per case",
    "scaling_reference_images": "Peak VRAM and s/step vs reference-image count",
    "scaling_resolution": "Peak VRAM and s/step vs resolution",
    "timeline": "VRAM and RAM timeline",
    "drift_speedup": "Drift vs speed-up",
}


def draw_plots(run_dir: Path, results: list[CaseResult], numbers: dict[str, int],
               timeline_case: str | None = None) -> Plots:
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    timeline = _timeline_result(results, run_dir, timeline_case)
    drawers: dict[str, Callable[[Path], str | None]] = {
        "pareto": lambda p: _plot_pareto(results, numbers, p),
        "stages": lambda p: _plot_stages(results, numbers, p),
        "scaling_reference_images": lambda p: _plot_scaling(
            results, p, ("reference_images",), "reference images", lambda c: c["reference_images"]),
        "scaling_resolution": lambda p: _plot_scaling(
            results, p, ("width", "height"), "megapixels", lambda c: c["width"] * c["height"] / 1e6),
        "timeline": lambda p: _plot_timeline(timeline, run_dir, p),
        "drift_speedup": lambda p: _plot_drift(results, numbers, p),
    }
    plots = Plots({}, {})
    for name, draw in drawers.items():
        path = plot_dir / f"{name}.png"
        skipped = draw(path)
        if skipped:
            plots.skipped[name] = skipped
        else:
            plots.paths[name] = path
    return plots


# --- rendering -----------------------------------------------------------------------------------

def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cell_text(frame: pd.DataFrame, key: str, name: str) -> str:
    """A cell as shown in md and html: formatted, "n/a" when unmeasured, with its change against another run."""
    value = frame.at[key, name]
    if _missing(value):
        return "n/a"
    text = COLUMN[name].fmt.format(value)
    if name == "status" and "status_before" in frame and not _missing(before := frame.at[key, "status_before"]):
        return text if before == value else f"{text} (was {before})"
    change = frame.at[key, f"{name}_change_pct"] if f"{name}_change_pct" in frame else None
    return text if _missing(change) else f"{text} ({change:+.1f}%)"


def _fits_cells(row: pd.Series, prices: dict[str, float]) -> list[str]:
    def text(value: Any, fmt: str = "{}") -> str:
        return "n/a" if _missing(value) else fmt.format(value)

    return [f"{row['resource']} {row['size_gb']:g} GB ({row['size_gib']:.2f} GiB)", text(row["setup"]),
            text(row["s_per_image"], "{:.2f}"), text(row["drift"]), text(row["basis"]),
            *(text(row[cost_column(name)], "${:.2f}") for name in prices)]


def _fits_headers(heading: str, prices: dict[str, float]) -> list[str]:
    return ["memory", "fastest setup", "s/image", f"drift ({heading})", "why it fits",
            *(f"USD per 1000 images at {name} ${usd:g}/h" for name, usd in prices.items())]


class _Footnotes:
    """Numbered reasons for Markdown cells, each distinct reason once."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def mark(self, reason: str) -> str:
        return f"[^{self.numbers.setdefault(reason, len(self.numbers) + 1)}]"

    def render(self) -> list[str]:
        return [f"[^{n}]: {reason}" for reason, n in self.numbers.items()]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(map(_md_escape, headers)) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# Tables are already grouped under a heading per block.
TABLE_COLUMNS = [name for name in COLUMN if name != "block"]


def _md_cell(frame: pd.DataFrame, key: str, name: str, notes: _Footnotes) -> str:
    text = _md_escape(cell_text(frame, key, name))
    if name == "status" and frame.at[key, "status"] != "ok":
        text = f"**{text.upper()}**"
    reason = frame.attrs["reasons"].get((key, name))
    return text + notes.mark(reason) if reason else text


@dataclass
class _Context:
    meta: dict[str, Any]
    heading: str
    other_run: str | None
    prices: dict[str, float]
    concurrent_slots: int  # the most cases the runner ran at a time (``run --devices``)


def _intro_lines(context: _Context) -> list[str]:
    env = context.meta.get("environment", {})
    lines = [f"Scenario: `{context.meta.get('scenario_path')}`, started {context.meta.get('created_at')}, "
             f"GPU: {env.get('gpu_name') or 'none'}, flux2bench {context.meta.get('flux2bench_version')}."]
    if context.heading == SYNTHETIC_LABEL:
        lines.append(f"Drift columns are {SYNTHETIC_LABEL}: they show how much a setting perturbs the computation, "
                     "not image quality.")
    lines.append(f"PSNR is capped at {PSNR_CAP_DB:g} dB, the value identical images get.")
    if context.concurrent_slots > 1:
        lines.append(f"Up to {context.concurrent_slots} cases ran at a time, one per GPU (`run --devices`): they shared "
                     "the host's CPUs, RAM bandwidth and disk, so host-bound timings (offload, loading) can be slower "
                     "than in a run of one case at a time; each case's GPU is in its record (setup.runner).")
    if context.other_run:
        lines.append(f"Numbers in parentheses are the change against run `{context.other_run}`.")
    if context.prices:
        lines.append(f"Costs use the s/image measured on {env.get('gpu_name') or 'this machine'}.")
    return lines


def render_markdown(frame: pd.DataFrame, fits: pd.DataFrame, plots: Plots, context: _Context) -> str:
    notes = _Footnotes()
    lines = [f"# flux2bench report: {context.meta.get('run_id')}", "", *_intro_lines(context), "", "## Results"]
    names = TABLE_COLUMNS
    headers = [header(COLUMN[n], context.heading) for n in names]
    if frame.empty:
        lines += ["", "No case has a record yet."]
    for block, rows in frame.groupby("block", sort=False):
        table_rows = [[_md_cell(frame, key, n, notes) for n in names] for key in rows.index]
        lines += ["", f"### Block `{block}`", "", *_md_table(headers, table_rows)]
    lines += ["", "## Fits on", "", FITS_NOTE]
    for workload, rows in fits.groupby("workload", sort=False):
        table_rows = [list(map(_md_escape, _fits_cells(row, context.prices))) for _, row in rows.iterrows()]
        lines += ["", f"### {workload}", "", *_md_table(_fits_headers(context.heading, context.prices), table_rows)]
    lines += ["", "## Plots", ""]
    for name, title in PLOT_TITLES.items():
        lines.append(f"![{title}](plots/{name}.png)" if name in plots.paths
                     else f"- {title}: not drawn, {plots.skipped[name]}")
    footnotes = notes.render()
    return "\n".join(lines + (["", "## Notes", "", *footnotes] if footnotes else [])) + "\n"


def write_csv(frame: pd.DataFrame, path: Path, heading: str) -> None:
    """The frame with display headers, a notes column carrying every reason, and "n/a" for unmeasured values."""
    table = frame.reset_index()
    reasons = frame.attrs["reasons"]
    table["notes"] = ["; ".join(f"{COLUMN[name].header}: {reason}" for (k, name), reason in reasons.items() if k == key)
                      for key in frame.index]
    table = table.rename(columns={c.name: header(c, heading) for c in COLUMNS})
    table.to_csv(path, index=False, na_rep="n/a")


# --- html ----------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; vertical-align: top; }
th { background: #f0f0f0; }
td.text { text-align: left; }
td.na { color: #888; }
td.bad { background: #f8d0d0; font-weight: bold; }
td.warn { background: #fbe8b0; font-weight: bold; }
.note { background: #eef4ff; padding: 0.5em 1em; border-left: 4px solid #6b8fd6; }
figure { display: inline-block; margin: 0.5em; text-align: center; font-size: 12px; }
figure.thumb { vertical-align: top; }
figure.thumb figcaption { max-width: 220px; overflow-wrap: anywhere; }
img { max-width: 100%; }
"""


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _thumbnail_uri(path: Path) -> str:
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return _png_data_uri(buffer.getvalue())


def _html_cell(frame: pd.DataFrame, key: str, name: str) -> str:
    text = cell_text(frame, key, name)
    reason = frame.attrs["reasons"].get((key, name))
    classes = []
    if name == "status" and frame.at[key, "status"] != "ok":
        classes.append("warn" if frame.at[key, "status"] == "drift_fail" else "bad")
    if text == "n/a":
        classes.append("na")
    if COLUMN[name].fmt == "{}":
        classes.append("text")
    title = f' title="{html.escape(reason)}"' if reason else ""
    return f'<td class="{" ".join(classes)}"{title}>{html.escape(text)}</td>'


def _html_table(headers: list[str], rows: list[str], group_row: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f'<div style="overflow-x:auto"><table>{group_row}<tr>{head}</tr>{"".join(rows)}</table></div>'


def _html_results(frame: pd.DataFrame, heading: str) -> str:
    names = TABLE_COLUMNS
    # One spanning header carries the drift label, so that the columns stay narrow enough to read.
    headers = [COLUMN[n].header for n in names]
    measured = sum(not COLUMN[n].drift for n in names)
    group_row = (f'<tr><th colspan="{measured}"></th>'
                 f'<th colspan="{len(names) - measured}">drift vs baseline ({html.escape(heading)})</th></tr>')
    parts = ["<h2>Results</h2>", '<p>Hover over "n/a" or a status for the reason.</p>']
    for block, rows in frame.groupby("block", sort=False):
        table_rows = ["<tr>" + "".join(_html_cell(frame, key, n) for n in names) + "</tr>" for key in rows.index]
        parts += [f"<h3>Block {html.escape(str(block))}</h3>", _html_table(headers, table_rows, group_row)]
    return "\n".join(parts)


def _html_fits(fits: pd.DataFrame, context: _Context) -> str:
    parts = ["<h2>Fits on</h2>", f"<p>{html.escape(FITS_NOTE)}</p>"]
    headers = _fits_headers(context.heading, context.prices)
    for workload, rows in fits.groupby("workload", sort=False):
        table_rows = ["<tr>" + "".join(f'<td class="text">{html.escape(c)}</td>'
                                       for c in _fits_cells(row, context.prices)) + "</tr>"
                      for _, row in rows.iterrows()]
        parts += [f"<h3>{html.escape(workload)}</h3>", _html_table(headers, table_rows)]
    return "\n".join(parts)


def _html_plots(plots: Plots) -> str:
    parts = ["<h2>Plots</h2>"]
    for name, title in PLOT_TITLES.items():
        if name in plots.paths:
            uri = _png_data_uri(plots.paths[name].read_bytes())
            parts.append(f'<figure><img src="{uri}" alt="{html.escape(title)}"><figcaption>'
                         f"{html.escape(title)}</figcaption></figure>")
        else:
            parts.append(f"<p>{html.escape(title)}: not drawn, {html.escape(plots.skipped[name])}</p>")
    return "\n".join(parts)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for name, value in data.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{name}.")
        else:
            flat[prefix + name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def _html_environment(meta: dict[str, Any]) -> str:
    rows = [f'<tr><td class="text">{html.escape(k)}</td><td class="text">{html.escape(v)}</td></tr>'
            for k, v in _flatten(meta.get("environment", {})).items()]
    scenario = html.escape(meta.get("scenario_text") or "")
    return (f"<h2>Environment</h2>{_html_table(['field', 'value'], rows)}"
            f"<details><summary>Scenario file</summary><pre>{scenario}</pre></details>")


def _drift_groups(results: list[CaseResult]) -> dict[str, list[CaseResult]]:
    groups: dict[str, list[CaseResult]] = {}
    for r in results:
        if r.drift and r.drift.baseline_key:
            groups.setdefault(r.drift.baseline_key, []).append(r)
    return groups


def _grid_figure(run_dir: Path, result: CaseResult, prompt: str, seed: int, caption: str) -> str:
    output = next((o for o in result.outputs if (result.case["prompts"][o.prompt], o.seed) == (prompt, seed)), None)
    if output is None or not (run_dir / output.image).is_file():
        return f'<figure class="thumb"><p>no image</p><figcaption>{html.escape(caption)}</figcaption></figure>'
    return (f'<figure class="thumb"><img src="{_thumbnail_uri(run_dir / output.image)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _variant_caption(result: CaseResult) -> str:
    return f"{result.label}: {_drift_summary(result)}"


def _html_drift_grids(run_dir: Path, results: list[CaseResult], heading: str) -> str:
    by_key = {r.key: r for r in results}
    parts = [f"<h2>Drift groups ({html.escape(heading)})</h2>"]
    if not _drift_groups(results):
        parts.append("<p>No drift groups in this run.</p>")
    for baseline_key, variants in _drift_groups(results).items():
        baseline = by_key.get(baseline_key)
        if baseline is None:
            parts.append(f"<p>Baseline {html.escape(baseline_key)} is not in this run.</p>")
            continue
        parts.append(f"<h3>Baseline: {html.escape(baseline.label)}</h3>")
        pairs = [(baseline.case["prompts"][o.prompt], o.seed) for o in baseline.outputs]
        for prompt, seed in pairs[:GRID_MAX_ROWS]:
            figures = [_grid_figure(run_dir, baseline, prompt, seed, f"baseline: {baseline.label}")]
            figures += [_grid_figure(run_dir, v, prompt, seed, _variant_caption(v)) for v in variants]
            parts.append(f"<p>seed {seed}, prompt: {html.escape(prompt)}</p><div>{''.join(figures)}</div>")
        if len(pairs) > GRID_MAX_ROWS:
            parts.append(f"<p>First {GRID_MAX_ROWS} of {len(pairs)} images shown.</p>")
    return "\n".join(parts)


def render_html(run_dir: Path, results: list[CaseResult], frame: pd.DataFrame, fits: pd.DataFrame, plots: Plots,
                context: _Context) -> str:
    intro = "".join(f'<p class="note">{html.escape(line.replace("`", ""))}</p>' for line in _intro_lines(context))
    title = html.escape(f"flux2bench report: {context.meta.get('run_id')}")
    body = [f"<h1>{title}</h1>", intro, _html_results(frame, context.heading), _html_fits(fits, context),
            _html_plots(plots), _html_drift_grids(run_dir, results, context.heading), _html_environment(context.meta)]
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style>'
            f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# --- entry point ---------------------------------------------------------------------------------

@dataclass
class ReportPaths:
    markdown: Path
    csv: Path
    html: Path
    plots: dict[str, Path]
    markdown_text: str


def build_report(run_dir: str | Path, baseline_dir: str | Path | None = None, prices: dict[str, float] | None = None,
                 timeline_case: str | None = None) -> ReportPaths:
    """Write report.md, report.csv, report.html and plots/*.png into the run directory."""
    store = RunStore.open(run_dir)
    results = store.results()
    frame = results_frame(results)
    other_run = None
    if baseline_dir is not None:
        other = RunStore.open(baseline_dir)
        frame = with_changes(frame, results_frame(other.results()))
        other_run = other.meta.get("run_id") or str(baseline_dir)
    prices = prices or {}
    fits = fits_on(results, prices=prices)
    plots = draw_plots(store.root, results, frame["number"].to_dict(), timeline_case)
    slots = max((r.setup.get("runner", {}).get("concurrent_slots", 1) for r in results), default=1)
    context = _Context(store.meta, drift_heading(results), other_run, prices, slots)
    paths = ReportPaths(store.root / "report.md", store.root / "report.csv", store.root / "report.html", plots.paths,
                        render_markdown(frame, fits, plots, context))
    paths.markdown.write_text(paths.markdown_text)
    write_csv(frame, paths.csv, context.heading)
    paths.html.write_text(render_html(store.root, results, frame, fits, plots, context))
    return paths
