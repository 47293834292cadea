"""``flux2bench report``: report.md, report.csv, report.html and plots of a run directory, and a short summary."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flux2bench.cli.common import fail, say, warn


def report(
    run_dir: Path = typer.Argument(..., help="run directory"),
    against: Optional[Path] = typer.Option(None, "--against", "--baseline",
                                           help="another run directory to show each measured cell's change against "
                                                "(--baseline is its earlier name)"),
    price: list[str] = typer.Option([], help="GPU=USD_PER_HOUR, e.g. H100=2.5 (repeatable); GPU names a kind of card "
                                             "the run's cases ran on (a part of its name, e.g. H100)"),
    timeline_case: Optional[str] = typer.Option(None, help="case key whose memory timeline is plotted"),
) -> None:
    """Write report.md, report.csv, report.html and plots into RUN_DIR, and print a short summary."""
    from flux2bench.report import build_report, summary_lines
    from flux2bench.store import RunDirError, RunStore

    prices = _prices(price)
    try:
        built = build_report(run_dir, other_run_dir=against, prices=prices or None, timeline_case=timeline_case)
    except (FileNotFoundError, RunDirError, ValueError) as exc:  # ValueError: e.g. a --timeline-case of no case
        raise fail(str(exc)) from None
    say("\n".join(summary_lines(built.answers)))
    say(f"report written to {built.html} (open it in a browser), {built.markdown} and {built.csv}")
    if problems := RunStore(run_dir).incomplete():  # each line "N case(s) ...: the keys", which report.md lists
        warn(f"the run {run_dir} is incomplete: {'; '.join(line.split(': ')[0] for line in problems)} "
             f"(report.md names them)")


def _prices(items: list[str]) -> dict[str, float]:
    from flux2bench.report.fits import parse_prices

    try:
        return parse_prices(items)
    except ValueError as exc:
        raise fail(str(exc)) from None
