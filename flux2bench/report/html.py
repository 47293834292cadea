"""The report as one self-contained HTML page: results, fits-on, plots and drift image grids embedded as data URIs."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from flux2bench.report.answers import Answers, Table
from flux2bench.report.fits import drift_summary
from flux2bench.report.frame import COLUMN, header, table_columns
from flux2bench.report.markdown import ReportContext, cell_text, intro_lines
from flux2bench.report.plots import Plots
from flux2bench.results import CaseResult
from flux2bench.store import inside

THUMBNAIL_PX = 192
TEXT_CLASS = ' class="text"'  # a column of words: left-aligned, header and cells alike
GRID_MAX_ROWS = 4


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; vertical-align: top; }
th.text, td.text { text-align: left; }
th { background: #f0f0f0; }
div.scroll { overflow: auto; max-height: 85vh; }
div.scroll th { position: sticky; top: 0; z-index: 1; }
div.scroll tr.groups + tr th { top: 1.7em; }
tr.groups th { height: 1.2em; text-align: center; }
section.answers { background: #f3f8f3; padding: 0.2em 0.8em; }
section.answers table { margin: 0.4em 0; background: #fff; }
section.answers h2, section.answers h3 { margin: 0.5em 0 0.2em; }
td.label { min-width: 16em; }
p.small { font-size: 12px; color: #555; margin: 0.2em 0; }
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
    if _is_text(name):
        classes.append("text")
    if name == "label":
        classes.append("label")
    title = f' title="{html.escape(reason)}"' if reason else ""
    return f'<td class="{" ".join(classes)}"{title}>{html.escape(text)}</td>'


def _is_text(name: str) -> bool:
    """A column of words (the case, its status), left-aligned like its header; numbers are right-aligned."""
    return COLUMN[name].fmt == "{}"


def _html_table(headers: list[str], rows: list[str], group_row: str = "", text: list[bool] | None = None) -> str:
    """A table whose headers align as their cells do: ``text`` says which columns hold words (all, by default)."""
    text = text if text is not None else [True] * len(headers)
    head = "".join(f"<th{TEXT_CLASS if words else ''}>{html.escape(h)}</th>" for h, words in zip(headers, text))
    return f'<div class="scroll"><table>{group_row}<tr>{head}</tr>{"".join(rows)}</table></div>'


def _group_titles(heading: str, on_gpu: bool) -> dict[str, str]:
    return {"case": "", "memory": "memory: peak GiB per phase", "time": "time (median of the timed images)",
            "derived": f"{'GPU time' if on_gpu else 'time'} held and compute",
            "drift": f"drift vs the bf16 baseline ({heading})"}


def _group_row(names: list[str], heading: str, on_gpu: bool) -> str:
    """One spanning header per group of columns (memory, time, drift), so that the columns stay narrow."""
    groups: list[list] = []
    for name in names:
        if groups and groups[-1][0] == COLUMN[name].group:
            groups[-1][1] += 1
        else:
            groups.append([COLUMN[name].group, 1])
    titles = _group_titles(heading, on_gpu)
    cells = "".join(f'<th colspan="{n}">{html.escape(titles[g])}</th>' for g, n in groups)
    return f'<tr class="groups">{cells}</tr>'


def _html_results(frame: pd.DataFrame, heading: str, on_gpu: bool) -> str:
    parts = ["<h2>Results</h2>", '<p>Hover over "n/a" or a status for the reason. Columns no case of a block has a '
             "value in are left out (report.csv has them all).</p>"]
    for block, rows in frame.groupby("block", sort=False):
        names = table_columns(frame, rows.index)
        headers = [header(COLUMN[n], heading, on_gpu, short=True) for n in names]
        table_rows = ["<tr>" + "".join(_html_cell(frame, key, n) for n in names) + "</tr>" for key in rows.index]
        parts += [f"<h3>Block {html.escape(str(block))}</h3>",
                  _html_table(headers, table_rows, _group_row(names, heading, on_gpu), [_is_text(n) for n in names])]
    return "\n".join(parts)


def _text_row(cells: list[str]) -> str:
    return "<tr>" + "".join(f'<td class="text">{html.escape(c)}</td>' for c in cells) + "</tr>"


def _html_answer_table(table: Table, level: str) -> str:
    parts = [f"<{level}>{html.escape(table.title)}</{level}>"]
    if table.rows:
        parts.append(_html_table(table.headers, list(map(_text_row, table.rows))))
    if table.note:
        parts.append(f"<p>{html.escape(table.note)}</p>")
    return "\n".join(parts)


def _html_answers(answers: Answers) -> str:
    parts = ['<section class="answers" id="answers"><h2>Answers</h2>', f"<p>{html.escape(answers.measured)}</p>"]
    if answers.fastest:
        parts.append(_html_answer_table(answers.fastest, "h3"))
    if answers.kinds:
        parts.append(_html_answer_table(answers.kinds, "h3"))
    parts += [f"<h3>{html.escape(answers.fits_title)}</h3>", f'<p class="small">{html.escape(answers.fits_note)}</p>']
    parts += [_html_answer_table(table, "h4") for table in answers.fits]
    return "\n".join(parts) + "</section>"


def _html_plots(plots: Plots) -> str:
    parts = ["<h2>Plots</h2>"]
    for name, title in plots.shown():
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
    output = next((o for o in result.outputs if (result.case.prompts[o.prompt], o.seed) == (prompt, seed)), None)
    if output is None or not inside(run_dir, output.image).is_file():
        return f'<figure class="thumb"><p>no image</p><figcaption>{html.escape(caption)}</figcaption></figure>'
    uri = _thumbnail_uri(inside(run_dir, output.image))
    return (f'<figure class="thumb"><img src="{uri}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _variant_caption(result: CaseResult) -> str:
    return f"{result.label}: {drift_summary(result)}"


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
        pairs = [(baseline.case.prompts[o.prompt], o.seed) for o in baseline.outputs]
        for prompt, seed in pairs[:GRID_MAX_ROWS]:
            figures = [_grid_figure(run_dir, baseline, prompt, seed, f"baseline: {baseline.label}")]
            figures += [_grid_figure(run_dir, v, prompt, seed, _variant_caption(v)) for v in variants]
            parts.append(f"<p>seed {seed}, prompt: {html.escape(prompt)}</p><div>{''.join(figures)}</div>")
        if len(pairs) > GRID_MAX_ROWS:
            parts.append(f"<p>First {GRID_MAX_ROWS} of {len(pairs)} images shown.</p>")
    return "\n".join(parts)


def render_html(run_dir: Path, results: list[CaseResult], frame: pd.DataFrame, answers: Answers, plots: Plots,
                context: ReportContext) -> str:
    intro = "".join(f'<p class="note">{html.escape(line.replace("`", ""))}</p>' for line in intro_lines(context))
    title = html.escape(f"flux2bench report: {context.meta.get('run_id')}")
    body = [f"<h1>{title}</h1>", _html_answers(answers), "<h2>About this run</h2>", intro,
            _html_results(frame, context.heading, context.on_gpu), _html_plots(plots),
            context.why.html(lambda path: _png_data_uri(path.read_bytes())) if context.why else "",
            _html_drift_grids(run_dir, results, context.heading), _html_environment(context.meta)]
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style>'
            f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n")
