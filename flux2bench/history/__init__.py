"""A history of runs: per case and gated metric, a series of one value per run, its change points, and a gate on
the newest runs.

``compare`` decides between two runs; a regression that arrives in steps below its threshold (five changes of 2%
each), or behind a baseline that moves with every merge, passes it every time. A history keeps the series and finds
where its level changed (``detect``: Apache Otava's e-divisive means with a t-test), with the size of each change
(medians before and after) and the run and commit where it starts. ``--gate`` fails when the newest runs start a
change point that is a regression beyond the metric's floor, or make one significant that started a run or two
before (``gate``: the rules of compare's gate.yaml).

Reading (``runs``): run directories in order of their start time (or as given); those incomplete, unreadable, of
another scenario or duplicated are skipped with the reason, and the gate cannot judge newest runs that one of them
would be among (exit code 2). Grouping (``series``): runs of another GPU model or
other library versions make a series of their own, never mixed in silently.
"""

from __future__ import annotations

from pathlib import Path

from flux2bench.history.analysis import Analysed, History, analyse, build_history
from flux2bench.history.detect import MAX_PVALUE, MIN_POINTS, change_points, found_after
from flux2bench.history.gate import ChangePoint
from flux2bench.history.html import render_html
from flux2bench.history.render import markdown
from flux2bench.history.runs import HistoryError, Skipped, check_label
from flux2bench.history.series import Series
from flux2bench.preflight import run_file_problem
from flux2bench.safe_files import write_atomic

__all__ = ["Analysed", "ChangePoint", "History", "HistoryError", "MAX_PVALUE", "MIN_POINTS", "Series", "Skipped",
           "analyse", "build_history", "change_points", "check_label", "found_after", "write_history"]


def write_history(history: History, out: str | Path) -> tuple[Path, Path]:
    """Write ``out/history.md`` and the self-contained ``out/history.html`` (links relative to ``out``); ValueError
    for an ``out`` inside a run directory."""
    out = Path(out)
    if problem := run_file_problem("out", out, folder=True):
        raise ValueError(problem)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "history.md", out / "history.html"
    write_atomic(md, markdown(history, out))
    write_atomic(page, render_html(history, out))
    return md, page
