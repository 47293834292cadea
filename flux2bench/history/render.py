"""A history in words: the gate's verdict, the change points, the series too short or kept apart, the skipped runs,
as Markdown (history.md, the CI job summary) and as tables for the terminal."""

from __future__ import annotations

import os
from pathlib import Path

from rich.table import Table

from flux2bench.compare.verdict import plural, rounded, unit_suffix
from flux2bench.history.analysis import Analysed, History
from flux2bench.history.gate import ChangePoint
from flux2bench.history.runs import HistoryRun
from flux2bench.metrics import BY_NAME

POINT_HEADERS = ["Case", "Metric", "Series", "Starts at run", "Code", "Median before → after", "Change", "p",
                 "Decision", "Runs at the new level", "Found with"]


def value_text(value: float, metric: str) -> str:
    return f"{rounded(value, metric)}{unit_suffix(metric)}"


def change_text(point: ChangePoint, metric: str) -> str:
    if point.change is None or BY_NAME[metric].kind == "drift":
        return f"{point.delta:+.3g}{unit_suffix(metric)}"
    return f"{point.change:+.1%}"


def run_href(run: HistoryRun, links_from: Path) -> str:
    """Where a link to a run points, relative to the folder ``links_from``: its report.html, else its directory."""
    target = run.path / "report.html" if (run.path / "report.html").is_file() else run.path
    return Path(os.path.relpath(target.resolve(), links_from.resolve())).as_posix()


def run_link(run: HistoryRun, links_from: Path | None) -> str:
    """A Markdown link to the run (its name alone without ``links_from``)."""
    return f"[`{run.run_id}`]({run_href(run, links_from)})" if links_from else f"`{run.run_id}`"


def series_text(entry: Analysed) -> str:
    series = entry.series
    text = f"{series.apart['GPU']}, {plural(len(series.points), 'run')}"
    return text + (f"; kept apart: {entry.apart_from}" if entry.apart_from else "")


def point_cells(history: History, entry: Analysed, point: ChangePoint, links_from: Path | None) -> list[str]:
    run = history.runs[point.run - 1]
    metric = entry.series.metric
    decision = point.decision + (" (fails the gate)" if history.gates(point) else "")
    return [f"{entry.series.case_label} (`{entry.series.case_key}`)", metric, series_text(entry),
            f"#{point.run} {run_link(run, links_from)}", run.code,
            f"{value_text(point.before, metric)} → {value_text(point.after, metric)}", change_text(point, metric),
            f"{point.pvalue:.2g}", f"{decision}; floor {point.floor}",
            str(point.runs_after), f"{plural(point.found_with, 'run')} at the new level"]


def intro(history: History, links_from: Path | None) -> str:
    first, last = history.runs[0], history.runs[-1]
    order = "by start time" if history.order == "time" else "in the order given"
    return (f"{plural(len(history.runs), 'run')} of `{last.scenario}`, oldest first ({order}): "
            f"{run_link(first, links_from)} ({first.started}) to {run_link(last, links_from)} ({last.started}); "
            f"{len(history.skipped)} skipped. Change points: Apache Otava (e-divisive means, t-test p <= "
            f"{history.max_pvalue:g}).")


def verdict_lines(history: History) -> list[str]:
    """What the gate decided and why, one line each."""
    newest = history.newest_runs
    if history.unjudged:
        return [history.unjudged]
    names = ", ".join(f"#{r.position} `{r.run_id}` ({r.code})" for r in newest)
    lines = [f"The gate looks at the newest {'run' if len(newest) == 1 else plural(len(newest), 'run')}: {names}."]
    if failures := history.failures():
        starts = "; ".join(f"{a.series.metric} from run #{p.run} ({history.runs[p.run - 1].code})"
                           for a, p in failures)
        lines.append(f"{plural(len(failures), 'regression')} beyond the metric's floor found with the newest runs: "
                     f"{starts}.")
    else:
        lines.append("No regression beyond its metric's floor found with the newest runs (a change point they start, "
                     "or one they make significant).")
    if short := history.short_of_history():
        lines.append(f"Not enough history for {len(short)} series of the newest runs (fewer runs than "
                     "change-point detection needs): not gated.")
    return lines


def summary_lines(history: History, gated: bool = True) -> list[str]:
    """The terminal's summary under the tables: what was read, then the gate's verdict (without ``--gate``, what it
    would decide: the exit code is 0 whatever it says)."""
    points = sum(len(a.change_points) for a in history.analysed)
    apart = [a for a in history.analysed if a.apart_from]
    lines = [f"{plural(len(history.runs), 'run')} of {history.runs[-1].scenario} read, oldest first "
             f"({'by start time' if history.order == 'time' else 'as given'}); {len(history.skipped)} skipped; "
             f"{len(history.analysed)} series, {plural(points, 'change point')}."]
    by_cause: dict[tuple[str, tuple[int, ...]], list[Analysed]] = {}
    for a in apart:  # one line per cause and runs, not per series: a run of another host sets every series apart
        by_cause.setdefault((str(a.apart_from), tuple(a.series.runs)), []).append(a)
    lines += [f"kept apart: {_series_named(group)}, {plural(len(runs), 'run')} (#{', #'.join(map(str, runs))}): "
              f"{cause}" for (cause, runs), group in by_cause.items()]
    verdict = f"history: {history.decision}." if gated else f"history, as --gate would judge it: {history.decision}."
    return lines + [f"{verdict} " + " ".join(verdict_lines(history)).replace("`", "")]


def _series_named(group: list[Analysed]) -> str:
    if len(group) == 1:
        return f"{group[0].series.case_key} {group[0].series.metric}"
    return f"{len(group)} series of {plural(len({a.series.case_key for a in group}), 'case')}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(headers), "|" + "---|" * len(headers), *map(_row, rows), ""]


def markdown(history: History, links_from: Path | None = None) -> str:
    """The history as Markdown; links to run directories are relative to ``links_from`` (none without it)."""
    icon = {0: "✅", 1: "❌"}.get(history.exit_code, "⚠️")
    lines = [f"### {icon} flux2bench history: {history.decision}", "", intro(history, links_from), "",
             *verdict_lines(history), "", *(f"⚠️ warning: {text}" for text in history.warnings),
             *([""] if history.warnings else [])]
    points = [(a, p) for a in history.analysed for p in a.change_points]
    lines += ["#### Change points", ""]
    lines += _md_table(POINT_HEADERS, [point_cells(history, a, p, links_from) for a, p in points]) if points else \
        ["No change point in any series.", ""]
    if short := [a for a in history.analysed if a.not_enough]:
        lines += ["#### Not enough history", "", *(f"- {a.series.case_label} (`{a.series.case_key}`) {a.series.metric}"
                                                   f" ({series_text(a)}): {a.not_enough}" for a in short), ""]
    if apart := [a for a in history.analysed if a.apart_from]:
        lines += ["#### Series kept apart (another GPU model, other versions or another host)", "",
                  *(f"- {a.series.case_key} {a.series.metric}: {plural(len(a.series.points), 'run')} "
                    f"(#{', #'.join(map(str, a.series.runs))}), {a.apart_from}" for a in apart), ""]
    if changed := [a for a in history.analysed if a.series.env_changes]:
        lines += ["#### Versions changed within a series (--allow-env-change)", ""]
        lines += [f"- {a.series.case_key} {a.series.metric}: " + "; ".join(f"at run #{run}: {text}"
                                                                            for run, text in a.series.env_changes)
                  for a in changed] + [""]
    if history.skipped:
        lines += ["#### Skipped run directories", "", *_md_table(["Run directory", "Why"],
                                                                  [[f"`{s.path}`", s.reason] for s in history.skipped])]
    lines += ["<details><summary>Runs</summary>", "",
              *_md_table(["#", "Run", "Started", "flux2bench commit", "Label", "GPU", "Host"], [
                  [str(r.position), run_link(r, links_from), r.started, r.commit or "—", r.label or "—",
                   r.gpu or "no GPU", r.host] for r in history.runs]), "</details>"]
    return "\n".join(lines) + "\n"


TERMINAL_COLUMNS = ("Case", "Metric", "Starts at run", "Code", "Median before → after", "Change", "p", "Decision")


def tables(history: History) -> list[Table]:
    """The change points (the floors are in history.md and the JSON) and the skipped runs, as terminal tables."""
    points = Table(title="Change points")
    for header in TERMINAL_COLUMNS:
        points.add_column(header, overflow="fold")
    keep = [POINT_HEADERS.index(header) for header in TERMINAL_COLUMNS]
    for a in history.analysed:
        for p in a.change_points:
            cells = point_cells(history, a, p, None)
            cells[0], cells[-3] = a.series.case_key, cells[-3].split(";")[0]
            points.add_row(*(cells[i].replace("`", "") for i in keep))
    found = [points] if points.row_count else []
    if history.skipped:
        skipped = Table(title="Skipped run directories")
        skipped.add_column("run directory", overflow="fold")
        skipped.add_column("why", overflow="fold")
        for s in history.skipped:
            skipped.add_row(s.path, s.reason)
        found.append(skipped)
    return found
