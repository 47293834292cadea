"""Records -> one DataFrame, the single source of every table of the report.

A value that was not measured stays None in the frame and renders as "n/a" with its reason (a footnote in
Markdown, a ``notes`` column in CSV, a title attribute in HTML), never as 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from flux2bench.axes import registry
from flux2bench.axes import cache, vram_cap
from flux2bench.drift_baseline import needs_drift
from flux2bench.drift import PRETRAINED_LABEL, SYNTHETIC_LABEL
from flux2bench.drift import unchecked_thresholds
from flux2bench.metrics import METRICS, PHASES, MetricSpec, Phase, drift_value, peak
from flux2bench.results import CaseResult, Metric
from flux2bench.scenario import DriftThresholds


Group = str  # "case", "memory", "time", "derived" or "drift": the heading a column sits under in the HTML tables


@dataclass(frozen=True)
class Column:
    name: str
    header: str
    fmt: str = "{}"
    drift: bool = False  # its header carries the run's drift label
    optional: bool = False  # shown only where some case has a value
    group: Group = "case"
    spec: MetricSpec | None = None
    phase: Phase | None = None  # a memory metric's phase
    short: str = ""  # the header under a group heading (HTML), where it differs from ``header``
    cpu_header: str = ""  # the header in a report of a CPU run (no case on a GPU), where it differs


TABLE_METRICS = tuple(spec for spec in METRICS if spec.in_table)
_GROUP = {"memory": "memory", "latency": "time", "stage": "time", "energy": "time", "derived": "derived",
          "drift": "drift"}


def _metric_columns(spec: MetricSpec) -> list[Column]:
    """A metric's columns: one per phase for a memory peak (each header names its phase), else one."""
    if spec.kind == "memory":
        return [Column(spec.phase_column(phase), spec.phase_header(phase), spec.fmt, optional=spec.optional,
                       group="memory", spec=spec, phase=phase, short=spec.phase_header(phase, short=True))
                for phase in PHASES]
    return [Column(spec.column_name, spec.header, spec.fmt, drift=spec.kind == "drift", optional=spec.optional,
                   group=_GROUP[spec.kind], spec=spec, cpu_header=spec.cpu_header)]


COLUMNS = (
    Column("number", "#"),
    Column("block", "block"),
    Column("label", "case"),
    Column("status", "status"),
    Column("card", "card", optional=True),
    Column("cap_gib", "GPU cap GiB", "{:g}"),
    Column("gpus", "GPUs", "{:d}", optional=True),
    Column("batch", "images/call", "{:d}", optional=True),
    *(column for spec in TABLE_METRICS for column in _metric_columns(spec)),
    Column("drift_failed", "drift thresholds broken", drift=True, group="drift"),
)
COLUMN = {c.name: c for c in COLUMNS}
ALWAYS_SHOWN = ("number", "label", "status")  # a per-block table drops any other column no case has a value in
# Columns whose change against another run is shown with ``report --against``: the measured ones.
MEASURED = tuple(c.name for c in COLUMNS if c.spec is not None)


def drift_heading(results: Iterable[CaseResult]) -> str:
    """The label every drift header carries; synthetic wins so that no synthetic number passes for quality."""
    return SYNTHETIC_LABEL if any(r.weights == "synthetic" for r in results) else PRETRAINED_LABEL


def header(column: Column, heading: str | None, on_gpu: bool = True, short: bool = False) -> str:
    """A column's header: under an HTML group heading its short form, in a CPU run's report its CPU wording, and a
    drift column's with the run's drift label (``heading``; None leaves it out)."""
    text = (column.cpu_header if not on_gpu and column.cpu_header else
            column.short if short and column.short else column.header)
    return f"{text} ({heading})" if column.drift and heading and not short else text


def no_drift_reason(result: CaseResult) -> str:
    if not needs_drift(result.case):
        return "this case is the bf16 baseline"
    if not result.status.ran:
        return f"case ended with status {result.status}"
    return ("no drift recorded: when drift was last attached, no finished baseline could be compared with this case "
            "(`run --resume RUN --drift-only` attaches it where a baseline has finished and both images are in the "
            "run directory)")


Cell = tuple[Any, str | None]  # (value, why the value is missing, or the status's reason)


def _cell(value: Any, missing: str | None) -> Cell:
    return value, missing if value is None else None


def _metric_cell(metric: Metric) -> Cell:
    return _cell(metric.value, metric.reason)


WARM_TIMINGS = ("s_per_step", "s_per_image")
STEP_CACHE_NOTE = ("a step cache computes some steps and reuses others: this median is one kind of step, not their "
                   "mix (the per-step samples are in the record); compare cached cases by s/image")
NO_WARMUP_NOTE = ("no warm-up: the timed images include the first call's costs (compilation, weights read from "
                  "disk, allocator growth); the record's per-step samples show them")


def _timing_missing(spec: MetricSpec, result: CaseResult) -> str:
    if spec.kind == "energy" and result.energy and result.energy.reason:
        return result.energy.reason
    if not result.status.ran:
        return f"case ended with status {result.status}"
    if spec.name == "reference_encoding_s" and not result.case.reference_images:
        return "no reference images"
    return spec.missing


def _drift_cell(spec: MetricSpec, result: CaseResult) -> Cell:
    if result.drift is None:
        return None, no_drift_reason(result)
    return _metric_cell(drift_value(result, spec.name) or Metric.missing(spec.name, "not computed"))


def metric_cell(column: Column, result: CaseResult) -> Cell:
    spec = column.spec
    if spec.kind == "memory":
        return _metric_cell(peak(result, spec.name, column.phase))
    if spec.kind == "drift":
        return _drift_cell(spec, result)
    if spec.derive is not None:
        return _metric_cell(spec.derive(result))
    value = spec.value(result)
    if value is not None and spec.name in WARM_TIMINGS and (note := _timing_note(result, spec.name)):
        return value, note
    if value is not None and spec.name == "first_call_s" and (note := _not_cacheable_note(result)):
        return value, note
    return _cell(value, _timing_missing(spec, result))


def _not_cacheable_note(result: CaseResult) -> str | None:
    """Why a case whose compiled code is kept for later runs (``compile_cache: portable``) compiles again there."""
    graphs = ((result.setup.axes.get("compile_cache") or {}).get("not_cacheable") or {}).get("graphs")
    if not graphs:
        return None
    return (f"{graphs} graph(s) compiled where inductor's FX-graph cache cannot keep them (the record's "
            "setup.compile.events.fx_graph_cache_bypasses says why): a later run with the same cache compiles them "
            "again")


def _timing_note(result: CaseResult, metric: str) -> str | None:
    """Why a case's warm timing is not that of a warm compiled model: no warm-up, compilation during the timed
    images, or functions dynamo gave up recompiling (they run uncompiled where no compiled variant fits); and why a
    step cache's median step says little."""
    if result.case.warmup == 0:
        return NO_WARMUP_NOTE
    notes = []
    if metric == "s_per_step" and cache.AXIS.caches(result.case):
        notes.append(STEP_CACHE_NOTE)
    if graphs := sum(result.latency.compiled_graphs):
        notes.append(f"torch.compile compiled {graphs} graph(s) during the timed images, after the warm-up (a "
                     "recompilation): these timings include compilation; the per-step samples show where")
    counters = (result.setup.axes.get("compile") or {}).get("cache_counters") or {}
    if over := counters.get("over_recompile_limit"):
        notes.append(f"dynamo reached its recompile limit on {over} function(s): calls that fit none of their "
                     "compiled variants ran uncompiled, so these timings are partly eager")
    return "; ".join(notes) or None


def _cells(number: int, result: CaseResult) -> dict[str, Cell]:
    """Every column of one row."""
    drift_failed = (None, no_drift_reason(result)) if result.drift is None else (
        ", ".join(result.drift.failed) or "none", _unchecked(result))
    return {
        "number": (number, None),
        "block": (result.block, None),
        "label": (result.label, None),
        "status": (str(result.status), result.reason or result.error),
        "card": (result.setup.gpu, None),
        "cap_gib": _cell(vram_cap.AXIS.cap_gib(result.case), "no emulated cap"),
        "gpus": (gpus_of(result), None),
        "batch": (result.batch_size, None),
        **{column.name: metric_cell(column, result) for column in COLUMNS if column.spec is not None},
        "drift_failed": drift_failed,
    }


def _unchecked(result: CaseResult) -> str | None:
    """Which drift thresholds of the case's block went unchecked because their metric was not measured."""
    unchecked = unchecked_thresholds(result.drift, DriftThresholds(**dict(result.case.drift_thresholds)))
    return f"set but not checked (metric not measured): {', '.join(unchecked)}" if unchecked else None


def _grouped_by_block(results: list[CaseResult]) -> list[CaseResult]:
    first_seen: dict[str, int] = {}
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
    unused = [c.name for c in COLUMNS if c.optional and _unused(frame, c.name)]
    frame = frame.drop(columns=unused)
    frame.attrs["reasons"] = {cell: reason for cell, reason in reasons.items() if cell[1] not in unused}
    return frame


def _unused(frame: pd.DataFrame, name: str) -> bool:
    """An optional column that tells nothing: no case has a value in it, every case ran on one GPU (the GPU
    count), made one image per call (the batch, and the throughput, which is then 3600 / s/image), or ran on the
    same kind of card (a run resumed on another machine shows which ran each)."""
    column = frame[name]
    return (column.isna().all() or (name in ("gpus", "batch") and (column == 1).all())
            or (name == "card" and column.nunique() <= 1)
            or (name == "images_per_hour_per_gpu" and all((frame[n] == 1).all() for n in ("gpus", "batch"))))


def gpus_of(result: CaseResult) -> int:
    """How many GPUs the case ran on (one per rank of a context-parallel case)."""
    return registry.gpus(result.case)


def table_columns(frame: pd.DataFrame, keys: Iterable[str] | None = None) -> list[str]:
    """The frame's columns of a per-block table (the block is its heading), in their groups' order; with ``keys``
    (one block's cases), the measurement columns none of them has a value in are left out."""
    names = [name for name in frame.columns if name in COLUMN and name != "block"]
    if keys is None:
        return names
    rows = frame.loc[list(keys)]
    return [name for name in names if name in ALWAYS_SHOWN or rows[name].notna().any()]


def with_changes(frame: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """The frame plus, for cases present in both runs, ``<column>_change_pct`` and ``status_before`` columns."""
    frame = frame.copy()
    for name in (name for name in MEASURED if name in frame and name in other):
        now = pd.to_numeric(frame[name], errors="coerce")
        before = pd.to_numeric(other[name].reindex(frame.index), errors="coerce")
        frame[f"{name}_change_pct"] = ((now - before) / before * 100).replace([np.inf, -np.inf], np.nan)
    frame["status_before"] = other["status"].reindex(frame.index)
    return frame
