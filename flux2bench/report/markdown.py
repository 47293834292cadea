"""The report as Markdown (tables per block, fits-on tables, plots, footnoted reasons) and as CSV."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from flux2bench.drift import PSNR_CAP_DB, SYNTHETIC_LABEL
from flux2bench.metrics import formatted
from flux2bench.report.answers import Answers, Table
from flux2bench.report.frame import COLUMN, COLUMNS, header, table_columns
from flux2bench.report.plots import Plots
from flux2bench.results import describe_gpus
from flux2bench.safe_files import replacing

if TYPE_CHECKING:
    from flux2bench.report.why import Why


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cell_text(frame: pd.DataFrame, key: str, name: str) -> str:
    """A cell as shown in md and html: formatted, "n/a" when unmeasured, with its change against another run."""
    value = frame.at[key, name]
    if _missing(value):
        return "n/a"
    text = formatted(value, COLUMN[name].fmt)
    if name == "status" and "status_before" in frame and not _missing(before := frame.at[key, "status_before"]):
        return text if before == value else f"{text} (was {before})"
    change = frame.at[key, f"{name}_change_pct"] if f"{name}_change_pct" in frame else None
    return text if _missing(change) else f"{text} ({change:+.1f}%)"


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


def _md_cell(frame: pd.DataFrame, key: str, name: str, notes: _Footnotes) -> str:
    text = _md_escape(cell_text(frame, key, name))
    if name == "status" and frame.at[key, "status"] != "ok":
        text = f"**{text.upper()}**"
    reason = frame.attrs["reasons"].get((key, name))
    return text + notes.mark(reason) if reason else text


@dataclass
class ReportContext:
    meta: dict[str, Any]
    heading: str
    other_run: str | None
    prices: dict[str, float]
    concurrent_slots: int  # the most cases the runner ran at a time (``run --devices``)
    cards: Counter = field(default_factory=Counter)  # GPU model -> cases measured on it
    held: str | None = None  # the run's time held (GPU time, on GPUs) against its timed images
    worker_starts: str | None = None  # how the workers started (fork server or fresh), and why
    incomplete: list[str] = field(default_factory=list)  # RunStore.incomplete: why cases lack a result
    on_gpu: bool = True  # some case ran on a GPU (metrics.ran_on_gpu); else the report speaks of the CPU
    why: Why | None = None  # the profiled cases' section (report.why), None when no case was profiled
    measured: bool = True  # some case has a valid record; else the report says nothing of where the cases ran


def intro_lines(context: ReportContext) -> list[str]:
    env = context.meta.get("environment", {})
    cards = describe_gpus(context.cards) if len(context.cards) > 1 else env.get("gpu_name") or "none"
    if not context.measured:  # no record says where a case ran: neither "GPU" nor "on the CPU" is known
        where = "no case measured yet" + (f" (the host's GPU: {env['gpu_name']})" if env.get("gpu_name") else "")
    elif context.on_gpu:
        where = f"GPU: {cards}"
    else:
        where = "on the CPU" + (f" (the host's {env['gpu_name']} was not used)" if env.get("gpu_name") else "")
    lines = [f"Scenario: `{context.meta.get('scenario_path')}`, started {context.meta.get('created_at')}, "
             f"{where}, flux2bench {context.meta.get('flux2bench_version')}."]
    if context.incomplete:
        lines.append(f"**Incomplete run**: {'; '.join(context.incomplete)}. Finish it with "
                     "`flux2bench run --resume RUN_DIR`.")
    if len(context.cards) > 1:
        lines.append("This run was measured on more than one kind of card (it was resumed on another machine): "
                     "the card column says which ran each case; compare timings only between cases of one card.")
    if context.heading == SYNTHETIC_LABEL:
        lines.append(f"Drift columns are {SYNTHETIC_LABEL}: they show how much a setting perturbs the computation, "
                     "not image quality.")
    lines.append(f"PSNR is capped at {PSNR_CAP_DB:g} dB, the value identical images get.")
    if context.concurrent_slots > 1:
        lines.append(f"Up to {context.concurrent_slots} cases ran at a time, one per GPU (`run --devices`): they shared "
                     "the host's CPUs, RAM bandwidth and disk, so host-bound timings (offload, loading) can be slower "
                     "than in a run of one case at a time; each case's GPU is in its record (setup.runner).")
    if context.held:
        lines.append(context.held)
    if context.worker_starts:
        lines.append(context.worker_starts)
    if context.other_run:
        lines.append(f"Numbers in parentheses are the change against run `{context.other_run}`.")
    if context.prices:
        lines.append(f"Costs use the s/image measured on {cards}.")
    return lines


def _md_answer_table(table: Table, level: str) -> list[str]:
    lines = ["", f"{level} {table.title}", ""]
    if table.rows:
        lines += _md_table(table.headers, [list(map(_md_escape, row)) for row in table.rows])
    return lines + (["", table.note] if table.note else [])


def answers_lines(answers: Answers) -> list[str]:
    lines = ["## Answers", "", answers.measured]
    if answers.fastest:
        lines += _md_answer_table(answers.fastest, "###")
    if answers.kinds:
        lines += _md_answer_table(answers.kinds, "###")
    lines += ["", f"### {answers.fits_title}", "", answers.fits_note]
    for table in answers.fits:
        lines += _md_answer_table(table, "####")
    return lines


def render_markdown(frame: pd.DataFrame, answers: Answers, plots: Plots, context: ReportContext) -> str:
    notes = _Footnotes()
    lines = [f"# flux2bench report: {context.meta.get('run_id')}", "", *answers_lines(answers), "",
             "## About this run", "", *intro_lines(context), "", "## Results"]
    if frame.empty:
        lines += ["", "No case has a record yet."]
    for block, rows in frame.groupby("block", sort=False):
        names = table_columns(frame, rows.index)
        headers = [header(COLUMN[n], context.heading, context.on_gpu) for n in names]
        table_rows = [[_md_cell(frame, key, n, notes) for n in names] for key in rows.index]
        lines += ["", f"### Block `{block}`", "", *_md_table(headers, table_rows)]
    lines += ["", "## Plots", ""]
    for name, title in plots.shown():
        lines.append(f"![{title}](plots/{name}.png)" if name in plots.paths
                     else f"- {title}: not drawn, {plots.skipped[name]}")
    if context.why is not None:
        lines += ["", *context.why.markdown()]
    footnotes = notes.render()
    return "\n".join(lines + (["", "## Notes", "", *footnotes] if footnotes else [])) + "\n"


def write_csv(frame: pd.DataFrame, path: Path, heading: str, on_gpu: bool = True) -> None:
    """The frame with display headers, a notes column carrying every reason, and "n/a" for unmeasured values."""
    table = frame.reset_index()
    reasons = frame.attrs["reasons"]
    table["notes"] = ["; ".join(f"{header(COLUMN[name], None, on_gpu)}: {reason}"
                                for (k, name), reason in reasons.items() if k == key)
                      for key in frame.index]
    table = table.rename(columns={c.name: header(c, heading, on_gpu) for c in COLUMNS if c.name in table})
    with replacing(path, "w") as csv:
        table.to_csv(csv, index=False, na_rep="n/a")
