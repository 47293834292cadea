"""The report of a run directory: report.md, report.csv, report.html and plots/*.png.

``frame`` turns the records into the DataFrame every table reads, ``fits`` answers "which setup for which card",
``plots`` draws, ``markdown`` and ``html`` render.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flux2bench.metrics import ran_on_gpu
from flux2bench.overhead import run_overhead, worker_starts
from flux2bench.report.answers import Answers, build_answers, summary_lines
from flux2bench.report.fits import NOTHING_FITS, check_prices, fits_on, gb_to_gib
from flux2bench.report.frame import drift_heading, results_frame, with_changes
from flux2bench.report.html import render_html
from flux2bench.report.markdown import ReportContext, cell_text, render_markdown, write_csv
from flux2bench.report.plots import draw_plots, not_drawn
from flux2bench.report.why import build_why
from flux2bench.results import measured_on
from flux2bench.safe_files import write_atomic
from flux2bench.store import RunStore

__all__ = ["NOTHING_FITS", "ReportPaths", "build_report", "cell_text", "fits_on", "gb_to_gib", "results_frame",
           "summary_lines"]


@dataclass
class ReportPaths:
    markdown: Path
    csv: Path
    html: Path
    plots: dict[str, Path]
    markdown_text: str
    answers: Answers


def build_report(run_dir: str | Path, other_run_dir: str | Path | None = None, prices: dict[str, float] | None = None,
                 timeline_case: str | None = None, plots: bool = True) -> ReportPaths:
    """Write report.md, report.csv, report.html and (unless ``plots`` is False) plots/*.png into the run
    directory; with ``other_run_dir``, each measured cell shows its change against that run (not the bf16 drift
    baseline, which drift columns compare with)."""
    store = RunStore.open(run_dir)
    results = store.results()
    frame = results_frame(results)
    other_run = None
    if other_run_dir is not None:
        other = RunStore.open(other_run_dir)
        frame = with_changes(frame, results_frame(other.results()))
        other_run = other.meta.get("run_id") or str(other_run_dir)
    prices = prices or {}
    check_prices(prices, list(measured_on(results)) or [g for g in [(store.meta.get("environment") or {}).get(
        "gpu_name")] if g])
    fits = fits_on(results, prices=prices)
    answers = build_answers(results, fits, drift_heading(results), prices)
    drawn = (draw_plots(store.root, results, frame["number"].to_dict(), timeline_case) if plots
             else not_drawn(results, "plots were not asked for"))
    slots = max((r.setup.runner.concurrent_slots for r in results if r.setup.runner), default=1)
    on_gpu = ran_on_gpu(results)
    context = ReportContext(store.meta, drift_heading(results), other_run, prices, slots, measured_on(results),
                            run_overhead(results, on_gpu), worker_starts(store.meta, results), store.incomplete(),
                            on_gpu, build_why(store.root, results, frame["number"].to_dict(), store.meta, draw=plots),
                            measured=bool(results))
    paths = ReportPaths(store.root / "report.md", store.root / "report.csv", store.root / "report.html", drawn.paths,
                        render_markdown(frame, answers, drawn, context), answers)
    write_atomic(paths.markdown, paths.markdown_text)
    write_csv(frame, paths.csv, context.heading, on_gpu)
    write_atomic(paths.html, render_html(store.root, results, frame, answers, drawn, context))
    return paths
