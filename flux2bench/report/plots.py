"""The report's plots: Pareto front of peak VRAM vs s/image per workload, stage latency, scaling with reference
images and resolution, a memory timeline, drift vs speed-up. Each drawer returns None, or why it drew nothing."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from flux2bench.axes import registry
from flux2bench.case import Case
from flux2bench.metrics import (BY_NAME, LARGER, PSNR, STAGES, host_ram_needed, images_per_hour_per_gpu, ran_on_gpu,
                                s_per_call, s_per_image, s_per_step, stage_s, vram_needed)
from flux2bench.report.fits import workload_of
from flux2bench.report.kinds import fastest_per_kind, plot_kinds
from flux2bench.report.frame import drift_heading
from flux2bench.record_checks import STOP_S
from flux2bench.results import CaseResult, WallSplit
from flux2bench.safe_files import replacing
from flux2bench.store import inside


VRAM_AXIS = f"peak VRAM GiB (device, else reserved;\n{LARGER})"


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (x, y) point, whether no other point is at least as good on both and better on one (lower is better)."""
    return [not any(ox <= x and oy <= y and (ox, oy) != (x, y) for ox, oy in points) for x, y in points]


def _finished(results: list[CaseResult]) -> list[CaseResult]:
    return [r for r in results if r.status.ran and s_per_image(r) is not None]


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    with replacing(path) as png:
        figure.savefig(png, format="png", dpi=100)


def _plot_pareto(results: list[CaseResult], numbers: dict[str, int], path: Path) -> str | None:
    """One Pareto front per workload: s/image across step counts or resolutions is not comparable."""
    points = [(r, *vram_needed(r)) for r in _finished(results)]
    points = [(r, peak, basis) for r, peak, basis in points if peak is not None]
    if not points:
        return "no finished case has a GPU memory peak"
    by_workload: dict[str, list[tuple[CaseResult, float]]] = {}
    for r, peak, _ in points:
        by_workload.setdefault(workload_of(r.case), []).append((r, peak))
    figure = Figure(figsize=(8, 4.5 + 0.25 * len(by_workload)))
    ax = figure.add_subplot()
    for (name, group), colour in zip(by_workload.items(), plt_colours()):
        xy = [(s_per_image(r), peak) for r, peak in group]
        ax.scatter(*zip(*xy), color=colour, label=name)
        front_xy = sorted(p for p, on in zip(xy, pareto_front(xy)) if on)
        ax.plot(*zip(*front_xy), "-", color=colour, alpha=0.6)
        for (r, _), (x, y) in zip(group, xy):
            ax.annotate(f"#{numbers[r.key]}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    bases = sorted({basis.split(" (")[0] for _, _, basis in points})
    ax.set(xlabel="s/image", ylabel=f"peak VRAM GiB ({', '.join(bases)};\n{LARGER})",
           title="Peak VRAM vs s/image; lines: Pareto front of each workload")
    ax.legend(fontsize=7, loc="best")
    _save(figure, path)
    return None


def plt_colours() -> list[str]:
    return [f"C{i % 10}" for i in range(100)]


def _stacked_bars(names: list[str], segments: list[tuple[str, np.ndarray, str | None]], xlabel: str, title: str,
                  path: Path) -> None:
    """One horizontal bar per case, stacked from (label, widths, colour) segments."""
    figure = Figure(figsize=(8, 1.5 + 0.35 * len(names)))
    ax = figure.add_subplot()
    left = np.zeros(len(names))
    for label, widths, colour in segments:
        ax.barh(names, widths, left=left, label=label, color=colour)
        left += widths
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(figure, path)


def _plot_stages(results: list[CaseResult], numbers: dict[str, int], path: Path) -> str | None:
    timed = _finished(results)
    if not timed:
        return "no finished case has timings"
    segments = [(stage, np.array([stage_s(r, stage) or 0.0 for r in timed]), None) for stage in STAGES]
    staged = sum(widths for _, widths, _ in segments)
    # stages are timed per pipeline call, which makes batch_size images
    segments.append(("other", np.clip(np.array([s_per_call(r) for r in timed]) - staged, 0, None), "lightgray"))
    _stacked_bars([f"#{numbers[r.key]}" for r in timed], segments,
                  "median seconds per pipeline call (one image at batch 1)", "Stage latency per case", path)
    return None


def _plot_wall_split(results: list[CaseResult], numbers: dict[str, int], path: Path) -> str | None:
    split = [r for r in results if r.wall_split is not None and r.wall_split.worker_wall_s is not None]
    if not split:
        return "no case has a wall-time split (records of an earlier version)"
    segments = [(part.removesuffix("_s").replace("_", " "),
                 np.array([max(0.0, getattr(r.wall_split, part) or 0.0) for r in split]),
                 "black" if part == "timed_s" else None) for part in ("artifacts_s", *WallSplit.PARTS)]
    _stacked_bars([f"#{numbers[r.key]}" for r in split], segments, "wall seconds held (timed images in black)",
                  "Where each case's wall time went", path)
    return None


def _plot_compute(results: list[CaseResult], numbers: dict[str, int], path: Path, on_gpu: bool = True) -> str | None:
    achieved, fraction_pct = BY_NAME["achieved_tflops"], BY_NAME["peak_fraction_pct"]
    rated = [(r, achieved.value(r), fraction_pct.value(r)) for r in results]
    rated = [(r, tflops, pct) for r, tflops, pct in rated if tflops is not None]
    if not rated:
        return "no case has FLOPs per step and a median s/step"
    figure = Figure(figsize=(8, 1.5 + 0.35 * len(rated)))
    ax = figure.add_subplot()
    names = [f"#{numbers[r.key]}" for r, _, _ in rated]
    bars = ax.barh(names, [tflops for _, tflops, _ in rated])
    if on_gpu:  # a CPU has no dense tensor-core peak to hold the figure against
        ax.bar_label(bars, [f"{pct:.0f}% of peak" if pct is not None else "peak unknown" for _, _, pct in rated],
                     fontsize=8, padding=3)
    ax.invert_yaxis()
    ax.set(xlabel="achieved TFLOP/s (denoising steps" + ("; all GPUs of the case)" if on_gpu else ")"),
           title=plot_titles(on_gpu)["compute"])
    _save(figure, path)
    return None


_SERIES_FIELDS = ("model", *(o.name for o in registry.options() if o.expands), "steps", "reference_images", "width",
                  "height")


def _series_names(cases: list[Case], axis_fields: tuple[str, ...]) -> list[str]:
    """A name per case from the fields that vary among the plotted cases, the x axis's own fields left out."""
    flat = [case.to_dict() for case in cases]
    varying = [f for f in _SERIES_FIELDS if f not in axis_fields and len({str(c[f]) for c in flat}) > 1]
    return [" ".join(f"{f}={c[f]}" for f in varying) or "all cases" for c in flat]


def _plot_scaling(results: list[CaseResult], path: Path, axis_fields: tuple[str, ...], xlabel: str,
                  x_of: Callable[[Case], float]) -> str | None:
    finished = _finished(results)
    series: dict[str, list[CaseResult]] = {}
    for name, r in zip(_series_names([r.case for r in finished], axis_fields), finished):
        series.setdefault(name, []).append(r)
    series = {name: members for name, members in series.items() if len({x_of(r.case) for r in members}) > 1}
    if not series:
        return f"no setup was measured at two or more values of {xlabel}"
    peaks = {name: [vram_needed(r)[0] for r in sorted(members, key=lambda r: x_of(r.case))]
             for name, members in series.items()}
    with_vram = any(p is not None for values in peaks.values() for p in values)
    # No GPU memory measured (a CPU run): the s/step panel alone, not an empty VRAM panel beside it.
    figure = Figure(figsize=(10, 4) if with_vram else (5.5, 4))
    vram_ax, step_ax = figure.subplots(1, 2) if with_vram else (None, figure.add_subplot())
    for name, members in series.items():
        members.sort(key=lambda r: x_of(r.case))
        xs = [x_of(r.case) for r in members]
        if vram_ax is not None and any(p is not None for p in peaks[name]):
            vram_ax.plot(xs, [np.nan if p is None else p for p in peaks[name]], "o-", label=name)
        step_ax.plot(xs, [np.nan if (step := s_per_step(r)) is None else step for r in members], "o-", label=name)
    if vram_ax is not None:
        vram_ax.set(xlabel=xlabel, ylabel=VRAM_AXIS, title=f"Peak VRAM vs {xlabel}")
    step_ax.set(xlabel=xlabel, ylabel="s/step", title=f"s/step vs {xlabel}" + ("" if with_vram else
                                                                                 " (no GPU memory measured)"))
    step_ax.legend(fontsize=7)
    _save(figure, path)
    return None


def vram_per_added_image(members: list[CaseResult]) -> float | None:
    """Peak VRAM growth per added image of one setup: the least-squares slope of the VRAM it needs (``vram_needed``)
    over the batch sizes it was measured at; None below two batch sizes with a peak."""
    points = [(r.batch_size, peak) for r in members if (peak := vram_needed(r)[0]) is not None]
    if len({batch for batch, _ in points}) < 2:
        return None
    return float(np.polyfit(*zip(*points), 1)[0])


def batch_series(results: list[CaseResult]) -> dict[str, list[CaseResult]]:
    """The finished setups measured at two or more batch sizes, by name, sorted by batch size. A setup's batch sizes
    may come from several blocks (a compiled setup compiles each batch anew, so one block per batch keeps each block
    short), never from several kinds of card."""
    finished = _finished(results)
    cards = {r.setup.gpu for r in finished}
    series: dict[str, list[CaseResult]] = {}
    for name, r in zip(_series_names([r.case for r in finished], ("batch_size",)), finished):
        series.setdefault(name + (f" [on {r.setup.gpu}]" if len(cards) > 1 else ""), []).append(r)
    return {name: sorted(members, key=lambda r: r.batch_size) for name, members in series.items()
            if len({r.batch_size for r in members}) > 1}


def _plot_throughput(results: list[CaseResult], path: Path, on_gpu: bool = True) -> str | None:
    """Images per hour per GPU and peak VRAM against batch size, one line per setup; the legend of the VRAM panel
    gives each setup's growth per added image."""
    series = batch_series(results)
    if not series:
        return "no setup was measured at two or more batch sizes"
    figure = Figure(figsize=(11, 4.5))
    rate_ax, vram_ax = figure.subplots(1, 2)
    for name, members in series.items():
        batches = [r.batch_size for r in members]
        rate_ax.plot(batches, [images_per_hour_per_gpu(r) for r in members], "o-", label=name)
        peaks = [vram_needed(r)[0] for r in members]
        if any(p is not None for p in peaks):
            slope = vram_per_added_image(members)
            growth = "n/a" if slope is None else f"{slope:+.2f} GiB/image"
            vram_ax.plot(batches, [np.nan if p is None else p for p in peaks], "o-", label=f"{name} ({growth})")
    rate_ax.set(xlabel="batch size (images per call)", ylabel="images/h per GPU" if on_gpu else "images/h",
                title="Throughput vs batch size")
    rate_ax.legend(fontsize=7)
    vram_ax.set(xlabel="batch size (images per call)", ylabel=VRAM_AXIS,
                title="Peak VRAM vs batch size (legend: least-squares growth per added image)")
    if vram_ax.lines:
        vram_ax.legend(fontsize=7)
    else:
        vram_ax.text(0.5, 0.5, "no GPU memory measured", ha="center", va="center", transform=vram_ax.transAxes)
    _save(figure, path)
    return None


def _timeline_result(results: list[CaseResult], run_dir: Path, chosen: str | None) -> CaseResult | None:
    with_timeline = [r for r in results if r.timeline and inside(run_dir, r.timeline).is_file()]
    if chosen is not None:
        matches = [r for r in results if chosen in (r.key, r.label)]
        if not matches:
            raise ValueError(f"no case has the key or label {chosen!r}")
        return matches[0] if matches[0].key in {r.key for r in with_timeline} else None
    return max(with_timeline, default=None, key=lambda r: (vram_needed(r)[0] or 0.0,
                                                           host_ram_needed(r) or 0.0))


TIMELINE_COLUMNS = {"gpu_used_gib": "GPU used", "rss_gib": "RSS", "anon_gib": "anonymous", "file_gib": "file-backed",
                    "shared_gib": "shared (pinned)"}


def _timeline_problem(samples: pd.DataFrame, timeout_s: float) -> str | None:
    """What in a timeline read back no sampler writes: a time outside the worker's life (at most its case's
    timeout, twice over with the wait for a fork server, see ``record_checks.STOP_S``), a memory size that is not a
    finite number of GiB, at least 0 where it is read directly (GPU used is net of the card's idle use before the
    worker, and a little below it where that use falls); None for a timeline to draw. Empty cells are samples a
    source did not give."""
    longest = 2 * timeout_s + STOP_S
    bounds = {column: (-math.inf if column == "gpu_used_gib" else 0.0, math.inf) for column in TIMELINE_COLUMNS}
    for column, (low, high) in {"t_s": (0.0, longest), **bounds}.items():
        if column not in samples:
            continue
        values = pd.to_numeric(samples[column], errors="coerce")
        bad = samples[column].notna() & ~(values.between(low, high) & np.isfinite(values))
        if bad.any():
            row = int(bad.idxmax())
            value = samples[column].iloc[row]
            shown = repr(value) if isinstance(value, str) else f"{float(value):g}"
            return f"row {row + 1}: {column} {shown} is not in [{low:g}, {high:g}]"
    return None


def _plot_timeline(result: CaseResult | None, run_dir: Path, path: Path) -> str | None:
    if result is None:
        return "no timeline recorded for the chosen case"
    timeline = inside(run_dir, result.timeline)
    try:
        samples = pd.read_csv(timeline)
        samples[["t_s", "phase"]]  # noqa: B018 - a timeline without them is not one
    except (OSError, EOFError, ValueError, KeyError, zlib.error) as exc:  # garbage, truncated, another file
        return f"{timeline} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if problem := _timeline_problem(samples, result.case.timeout_s):
        return f"{timeline} is not a memory timeline ({problem})"
    figure = Figure(figsize=(9, 4))
    ax = figure.add_subplot()
    for column, name in TIMELINE_COLUMNS.items():
        if column in samples and samples[column].notna().any():  # timelines of earlier versions lack shared_gib
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
        psnr = r.drift.metrics.get(PSNR) if r.drift else None
        if baseline and s_per_image(baseline) and psnr and psnr.value is not None:
            points.append((r, s_per_image(baseline) / s_per_image(r), psnr.value))
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
    # Higher is better on both axes: the front of the points no other beats in speed-up and PSNR at once.
    xy = [(-speedup, -psnr) for _, speedup, psnr in points]
    front = sorted((-x, -y) for (x, y), on in zip(xy, pareto_front(xy)) if on)
    ax.plot(*zip(*front), "-", color="C1", alpha=0.6, label="Pareto front")
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.legend(fontsize=8)
    ax.set(xlabel="speed-up vs baseline (baseline s/image / case s/image)",
           ylabel=f"PSNR dB ({drift_heading(results)})", title="Drift vs speed-up; line: Pareto front")
    _save(figure, path)
    return None


@dataclass
class Plots:
    paths: dict[str, Path]
    skipped: dict[str, str]  # plot name -> why it was not drawn
    on_gpu: bool = True  # some case ran on a GPU; else the titles speak of what a CPU run measures

    def shown(self) -> list[tuple[str, str]]:
        """(name, title) of each plot drawn or skipped with a reason; a plot of figures no record has is left out."""
        return [(name, title) for name, title in plot_titles(self.on_gpu).items()
                if name in self.paths or name in self.skipped]


PLOT_TITLES = {
    "pareto": "Peak VRAM vs s/image (Pareto front)",
    "stages": "Stage latency per case",
    "scaling_reference_images": "Peak VRAM and s/step vs reference-image count",
    "scaling_resolution": "Peak VRAM and s/step vs resolution",
    "timeline": "VRAM and RAM timeline",
    "drift_speedup": "Drift vs speed-up",
    "wall_split": "Where each case's wall time went",
    "compute": "Achieved TFLOP/s and fraction of the card's dense peak",
    "throughput_batch": "Images per hour per GPU and peak VRAM vs batch size",
    "gpu_kinds": "GPU kinds side by side: s/image and energy of each kind's fastest setup",
}
# A CPU run's plots show no VRAM and no card's peak.
CPU_PLOT_TITLES = {
    "scaling_reference_images": "s/step vs reference-image count",
    "scaling_resolution": "s/step vs resolution",
    "timeline": "RAM timeline",
    "compute": "Achieved TFLOP/s",
    "throughput_batch": "Images per hour vs batch size",
}
GPU_ONLY_PLOTS = ("pareto", "gpu_kinds")


def plot_titles(on_gpu: bool) -> dict[str, str]:
    """Each plot's title in the report, in the order shown; a CPU run's have no VRAM and no card in them."""
    if on_gpu:
        return PLOT_TITLES
    return {name: CPU_PLOT_TITLES.get(name, title) for name, title in PLOT_TITLES.items() if name not in GPU_ONLY_PLOTS}


# Plots of figures that records of earlier versions lack: left out of a report whose records have none.
RECORDED_SINCE: dict[str, Callable[[CaseResult], bool]] = {
    "wall_split": lambda r: r.wall_split is not None,
    "compute": lambda r: bool(r.latency and r.latency.transformer_calls),
}


def _has_figures(name: str, results: list[CaseResult]) -> bool:
    return name not in RECORDED_SINCE or any(RECORDED_SINCE[name](r) for r in results)


def not_drawn(results: list[CaseResult], reason: str) -> Plots:
    """Every plot the records have figures for, skipped for ``reason`` (e.g. plots were not asked for)."""
    on_gpu = ran_on_gpu(results)
    return Plots({}, {name: reason for name in plot_titles(on_gpu) if _has_figures(name, results)}, on_gpu)


def draw_plots(run_dir: Path, results: list[CaseResult], numbers: dict[str, int],
               timeline_case: str | None = None) -> Plots:
    timeline = _timeline_result(results, run_dir, timeline_case)  # an unknown case is refused before any write
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    on_gpu = ran_on_gpu(results)
    drawers: dict[str, Callable[[Path], str | None]] = {
        "pareto": lambda p: _plot_pareto(results, numbers, p),
        "stages": lambda p: _plot_stages(results, numbers, p),
        "scaling_reference_images": lambda p: _plot_scaling(
            results, p, ("reference_images",), "reference images", lambda c: c.reference_images),
        "scaling_resolution": lambda p: _plot_scaling(
            results, p, ("width", "height"), "megapixels", lambda c: c.width * c.height / 1e6),
        "timeline": lambda p: _plot_timeline(timeline, run_dir, p),
        "drift_speedup": lambda p: _plot_drift(results, numbers, p),
        "wall_split": lambda p: _plot_wall_split(results, numbers, p),
        "compute": lambda p: _plot_compute(results, numbers, p, on_gpu),
    }
    if not on_gpu:  # no VRAM to plot against s/image
        del drawers["pareto"]
    if any(r.batch_size > 1 for r in results):  # a run without batches has no throughput plot to speak of
        drawers["throughput_batch"] = lambda p: _plot_throughput(results, p, on_gpu)
    if fastest_per_kind(results):  # nor a run on one GPU model a comparison of kinds
        drawers["gpu_kinds"] = lambda p: plot_kinds(results, p)
    plots = Plots({}, {}, on_gpu=on_gpu)
    for name, draw in drawers.items():
        if not _has_figures(name, results):
            continue
        path = plot_dir / f"{name}.png"
        skipped = draw(path)
        if skipped:
            plots.skipped[name] = skipped
        else:
            plots.paths[name] = path
    return plots
