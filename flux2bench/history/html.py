"""history.html: one self-contained page, the verdict and tables of history.md and one time series per case and
metric (inline SVG drawn by matplotlib), change points marked, each point a link to its run directory."""

from __future__ import annotations

import html
import io
import re
import statistics
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from flux2bench.history.analysis import Analysed, History
from flux2bench.history.render import (POINT_HEADERS, change_text, intro, point_cells, run_href, run_link, series_text,
                                       value_text, verdict_lines)

COLOURS = {"regression": "#c0392b", "improvement": "#1e8449", "within floor": "#7f8c8d", "reported": "#7f8c8d"}
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr.fails td { background: #f8d0d0; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption { font-size: 12px; max-width: 640px; }
.note { background: #eef4ff; padding: 0.5em 1em; border-left: 4px solid #6b8fd6; }
"""


def _inline(text: str) -> str:
    """Markdown's inline code and links, as HTML (the cells are shared with history.md)."""
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"\[`([^`]*)`\]\(([^)]*)\)", lambda m: f'<a href="{html.escape(m[2])}"><code>{m[1]}</code></a>',
                     escaped)
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", escaped)


def _table(headers: list[str], rows: list[tuple[list[str], str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(f'<tr class="{cls}">' + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>"
                   for cells, cls in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def series_svg(history: History, entry: Analysed, page_dir: Path) -> str:
    """One series as an inline SVG: a point per run (a link to its run directory), each level's median as a line,
    each change point as a dashed line coloured by its decision."""
    series, metric = entry.series, entry.series.metric
    x, y = series.runs, series.values
    figure = Figure(figsize=(6.4, 2.6))
    ax = figure.add_subplot()
    ax.plot(x, y, color="#b0b7c3", linewidth=0.8, zorder=1)
    dots = ax.scatter(x, y, s=18, color="#2c3e50", zorder=2)
    dots.set_urls([run_href(history.runs[run - 1], page_dir) for run in x])
    bounds = [0, *(p.index for p in entry.change_points), len(x)]
    for start, end in zip(bounds, bounds[1:]):
        ax.hlines(statistics.median(y[start:end]), x[start] - 0.3, x[end - 1] + 0.3, color="#34495e", linewidth=1,
                  alpha=0.5)
    for point in entry.change_points:
        ax.axvline(point.run - 0.5, color=COLOURS[point.decision], linestyle="--", linewidth=1.2)
        ax.annotate(change_text(point, metric), (point.run - 0.5, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -10), textcoords="offset points", fontsize=7, color=COLOURS[point.decision])
    newest = len(history.runs) - history.newest + 0.5
    ax.axvspan(newest, len(history.runs) + 0.5, color="#f5e6b8", alpha=0.5, zorder=0)
    ax.set_xlim(0.5, len(history.runs) + 0.5)
    ax.set_xlabel("run (oldest first; shaded: the runs the gate looks at)", fontsize=8)
    ax.set_ylabel(f"{metric}{' (' + series.spec.unit + ')' if series.spec.unit else ''}", fontsize=8)
    ax.tick_params(labelsize=7)
    figure.tight_layout()
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "flux2bench-history"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    return re.sub(r"\s*<metadata>.*?</metadata>", "", svg[svg.index("<svg"):], flags=re.S)


def _figure(history: History, entry: Analysed, page_dir: Path) -> str:
    series = entry.series
    marks = "; ".join(f"run #{p.run}: {value_text(p.before, series.metric)} → {value_text(p.after, series.metric)}"
                      f" ({p.decision})" for p in entry.change_points) or entry.not_enough or "no change point"
    caption = f"{series.case_label} ({series.case_key}), {series.metric}: {series_text(entry)}. {marks}"
    return f"<figure>{series_svg(history, entry, page_dir)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def render_html(history: History, page_dir: Path) -> str:
    """The page, with links relative to ``page_dir`` (where it is written)."""
    title = f"flux2bench history: {history.decision}"
    points = [(point_cells(history, a, p, page_dir), "fails" if history.gates(p) else "")
              for a in history.analysed for p in a.change_points]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{_inline(intro(history, page_dir))}</p>",
            *(f'<p class="note">{_inline(line)}</p>' for line in verdict_lines(history)),
            "<h2>Change points</h2>",
            _table(POINT_HEADERS, points) if points else "<p>No change point in any series.</p>",
            "<h2>Series</h2>", "<p>Each point links to its run directory; dashed lines mark change points (red: "
            "regression, green: improvement, grey: within the metric's floor or not gated).</p>",
            *(_figure(history, entry, page_dir) for entry in history.analysed)]
    if history.skipped:
        body += ["<h2>Skipped run directories</h2>", _table(["Run directory", "Why"],
                                                            [([f"`{s.path}`", s.reason], "") for s in history.skipped])]
    runs = [([str(r.position), run_link(r, page_dir), r.started, r.commit or "—", r.label or "—", r.gpu or "no GPU",
              r.host], "") for r in history.runs]
    body += ["<h2>Runs</h2>", _table(["#", "Run", "Started", "flux2bench commit", "Label", "GPU", "Host"], runs)]
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
