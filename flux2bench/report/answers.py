"""The report's opening: what was measured, the fastest setup that fits each card, the fastest per number of cards.

Built from ``fits_on``'s table and the records; ``markdown`` and ``html`` render the same ``Answers``. Card sizes
whose answer is the same setup are one row ("48 GB and up"), and sizes nothing measured fits are one sentence.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from flux2bench.metrics import (BY_NAME, LARGER, by_call_time, formatted, host_ram_needed, ran_on_gpu, s_per_call,
                                vram_needed)
from flux2bench.report.fits import (CPU_FITS_NOTE, FITS_NOTE, NOTHING_FITS, THROUGHPUT_COLUMNS, cost_column, gb_to_gib,
                                    has_throughput, setup_label, text_encoder_place, throughput_cost_column,
                                    workload_of)
from flux2bench.report.frame import gpus_of
from flux2bench.report.kinds import TITLE as KINDS_TITLE
from flux2bench.report.kinds import kinds_rows
from flux2bench.results import CaseResult, describe_gpus, measured_on

PEAK_HEADER = f"why it fits (the peak it needs, {LARGER})"
HOST_RAM_HEADER = f"host RAM it needs GiB (RSS, {LARGER})"
S_PER_CALL = BY_NAME["s_per_call"].header  # the fastest setup is the shortest wait for an image: a whole call


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""  # one sentence under the table (e.g. the card sizes nothing measured fits)


@dataclass
class Answers:
    measured: str  # one line: what was measured, on what
    fits: list[Table] = field(default_factory=list)  # one per workload
    fastest: Table | None = None
    kinds: Table | None = None  # several GPU kinds side by side, when the run has them
    on_gpu: bool = True  # some case ran on a GPU; else the answers speak of the CPU and host RAM, not of cards

    @property
    def fits_title(self) -> str:
        return "Fastest setup that fits, per card size" if self.on_gpu else "Fastest setup that fits, per host RAM size"

    @property
    def fits_note(self) -> str:
        return FITS_NOTE if self.on_gpu else CPU_FITS_NOTE


def _text(value: Any, fmt: str = "{}") -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "n/a" if missing else formatted(value, fmt)


def _runs(rows: pd.DataFrame) -> list[pd.DataFrame]:
    """Consecutive sizes with the same answer (the same case, or nothing; and the same best throughput)."""
    answer = rows["key"].fillna("")
    if has_throughput(rows):
        answer = answer + "|" + rows[THROUGHPUT_COLUMNS[0]].fillna("")
    return [group for _, group in rows.groupby((answer != answer.shift()).cumsum(), sort=False)]


def _drift_short(row: pd.Series) -> str:
    text = row["drift"]
    return text.split(";")[0] if isinstance(text, str) and text.startswith("PSNR") else "not measured"


def _fits_table(workload: str, rows: pd.DataFrame, heading: str, prices: dict[str, float], gpu_measured: bool,
                on_gpu: bool) -> Table:
    headers = ["memory", "fastest setup that fits", S_PER_CALL, HOST_RAM_HEADER, "text encoder",
               f"drift ({heading})", PEAK_HEADER, *(f"USD per 1000 images at {n} ${u:g}/h" for n, u in prices.items())]
    throughput = has_throughput(rows)  # a run with batches: the best throughput that fits beside the fastest
    if throughput:
        headers += ["best throughput that fits", "batch", "images/h per GPU",
                    *(f"USD per 1000 images at best throughput, {n} ${u:g}/h" for n, u in prices.items())]
    table, nothing = [], []
    if not gpu_measured:  # a CPU run: one sentence, not a row per card size
        rows = rows[rows["resource"] == "host RAM"]
    for resource, of_resource in rows.groupby("resource", sort=False):
        last = of_resource["size_gb"].iloc[-1]
        for run in _runs(of_resource):
            first = run.iloc[0]
            sizes = list(run["size_gb"])
            label = f"{resource} {sizes[0]:g} GB ({gb_to_gib(sizes[0]):.2f} GiB)"
            label += "" if len(sizes) == 1 and sizes[0] != last else (
                " and up" if sizes[-1] == last else f" to {sizes[-1]:g} GB")
            if first["setup"] == NOTHING_FITS:
                nothing.append(f"{resource} of {sizes[-1]:g} GB or less" if sizes[0] == of_resource["size_gb"].iloc[0]
                               else f"{resource} {sizes[0]:g} to {sizes[-1]:g} GB")
                continue
            basis = first["basis"] if len(sizes) == 1 else first["basis"].split(" <=")[0]
            table.append([label, first["short_setup"], _text(first["s_per_call"], "{:.2f}"),
                          _text(first["host_ram_gib"], "{:.2f}"), first["text_encoder"], _drift_short(first), basis,
                          *(_text(first[cost_column(n)], "${:.2f}") for n in prices),
                          *([first["throughput_setup"], _text(first["throughput_batch"], "{:.0f}"),
                             _text(first["images_per_hour_per_gpu"], "{:.0f}"),
                             *(_text(first[throughput_cost_column(n)], "${:.2f}") for n in prices)]
                            if throughput else [])])
    notes = [f"Nothing measured fits {', '.join(nothing)}." if nothing else "",
             "" if gpu_measured or not on_gpu else  # a CPU run says it once, above every workload
             "No finished case of this workload has a GPU memory peak: no card is answered."]
    return Table(workload, headers, table, " ".join(n for n in notes if n))


def _fastest(results: list[CaseResult], on_gpu: bool) -> Table | None:
    """Per workload and number of GPUs, the fastest finished setup (the shortest wait for an image: a whole pipeline
    call, however many images it makes); with several GPU kinds, one column per kind; in a CPU run, per workload."""
    finished = [r for r in results if r.status.ran and s_per_call(r) is not None]
    if not finished:
        return None
    kinds = list(measured_on(finished)) if len(measured_on(finished)) > 1 else [None]
    groups: dict[tuple[str, int], list[CaseResult]] = {}
    for r in finished:
        groups.setdefault((workload_of(r.case), gpus_of(r)), []).append(r)
    if not on_gpu:
        return _fastest_on_the_cpu(groups)
    if len(kinds) == 1:
        headers = ["workload", "GPUs", "fastest setup", S_PER_CALL, f"peak VRAM per GPU GiB ({LARGER})",
                   "host RAM GiB", "text encoder"]
    else:
        headers = ["workload", "GPUs", *(f"fastest on {kind}" for kind in kinds)]
    rows = []
    for (workload, gpus), members in groups.items():
        if len(kinds) == 1:
            best = min(members, key=by_call_time)
            rows.append([workload, str(gpus), setup_label(best.case), _text(s_per_call(best), "{:.2f}"),
                         _text(vram_needed(best)[0], "{:.2f}"), _text(host_ram_needed(best), "{:.2f}"),
                         text_encoder_place(best.case)])
            continue
        cells = []
        for kind in kinds:
            on_kind = [r for r in members if r.setup.gpu == kind]
            best = min(on_kind, key=by_call_time) if on_kind else None
            cells.append("not measured" if best is None else
                         f"{setup_label(best.case)}: {_text(s_per_call(best), '{:.2f}')} {S_PER_CALL}, "
                         f"VRAM {_text(vram_needed(best)[0], '{:.1f}')} GiB")
        rows.append([workload, str(gpus), *cells])
    return Table(GPU_FASTEST_TITLE, headers, rows)


GPU_FASTEST_TITLE = "Fastest setup per number of GPUs"
CPU_FASTEST_TITLE = "Fastest setup per workload, on the CPU"


def _fastest_on_the_cpu(groups: dict[tuple[str, int], list[CaseResult]]) -> Table:
    """A CPU run's fastest setup per workload: no GPU count, no VRAM."""
    rows = []
    for (workload, _), members in groups.items():
        best = min(members, key=by_call_time)
        rows.append([workload, setup_label(best.case), _text(s_per_call(best), "{:.2f}"),
                     _text(host_ram_needed(best), "{:.2f}"), text_encoder_place(best.case)])
    return Table(CPU_FASTEST_TITLE, ["workload", "fastest setup", S_PER_CALL, "host RAM GiB", "text encoder"], rows)
_DEVICE_NAMES = {"cpu": "the CPU"}


def _measured(results: list[CaseResult]) -> str:
    ran = sum(r.status.ran for r in results)
    workloads = len({workload_of(r.case) for r in results})
    cards = measured_on(results)
    devices = Counter(_DEVICE_NAMES.get(r.setup.device, r.setup.device) for r in results
                      if r.setup.device and not r.setup.gpu)
    where = describe_gpus(cards) if cards else ", ".join(devices) or "no recorded device"
    return (f"Measured: {len(results)} case{'s' * (len(results) != 1)} of {workloads} "
            f"workload{'s' * (workloads != 1)} on {where}; {ran} ran to the end.")


def build_answers(results: list[CaseResult], fits: pd.DataFrame, heading: str, prices: dict[str, float]) -> Answers:
    on_gpu = ran_on_gpu(results)
    answers = Answers(_measured(results), fastest=_fastest(results, on_gpu), on_gpu=on_gpu)
    headers, rows = kinds_rows(results, prices)
    if rows:
        answers.kinds = Table(KINDS_TITLE, headers, rows, "Each GPU model's fastest setup per workload; the cost "
                                                           "pays every GPU of a case at its --price per hour.")
    by_workload: dict[str, list[CaseResult]] = {}
    for r in results:
        by_workload.setdefault(workload_of(r.case), []).append(r)
    for workload, rows in fits.groupby("workload", sort=False):
        gpu_measured = any(vram_needed(r)[0] is not None for r in by_workload[workload] if r.status.ran)
        answers.fits.append(_fits_table(workload, rows, heading, prices, gpu_measured, on_gpu))
    return answers


SUMMARY_ROWS = 8


def summary_lines(answers: Answers) -> list[str]:
    """The report in a few lines for a terminal: what was measured and the fastest setup per workload and GPU count
    (per workload, in a CPU run)."""
    lines = [answers.measured]
    rows = answers.fastest.rows if answers.fastest else []
    for row in rows[:SUMMARY_ROWS]:
        if not answers.on_gpu:
            workload, setup, seconds, *_ = row
            lines.append(f"  fastest, {workload}, on the CPU: {setup}, {seconds} {S_PER_CALL}")
            continue
        workload, gpus, *cells = row
        on = f"{gpus} GPU{'s' * (gpus != '1')}"
        one_kind = answers.fastest.headers[2] == "fastest setup"
        best = f"{cells[0]}, {cells[1]} {S_PER_CALL}" if one_kind else "; ".join(
            f"{h.removeprefix('fastest on ')}: {c}" for h, c in zip(answers.fastest.headers[2:], cells))
        lines.append(f"  fastest, {workload}, {on}: {best}")
    if len(rows) > SUMMARY_ROWS:
        lines.append(f"  ... {len(rows) - SUMMARY_ROWS} more in the report")
    return lines
