"""Every number of docs/overhead.md's table re-derived from the run directories its row names (see
test_measured_tables.py for how a cell is read).

The records hold each part of a case's wall time (``wall_split``), the fork server's import time (``run.json``) and
the GPU-seconds held per timed GPU-second (the metric registry's ``gpu_s_per_timed_s``). The end-to-end wall of a
command, timed by the shell around it, is in no record: it was written where the runs were made, in a series'
``timings-N.txt`` or in a run's ``NOTES.md`` table, and is read from there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest

from doc_tables import REPO, REPORTS, check, record, run, table_with, tables
from flux2bench.metrics import BY_NAME
from flux2bench.results import CaseResult

OVERHEAD = REPO / "docs" / "overhead.md"
SERIES = "ci-fork-server-h200-20261203"


@dataclass(frozen=True)
class Timings:
    """A shell timing line ``LABEL rc=0 wall_s=SECONDS`` of a series' timings file."""

    file: str
    label: str

    def wall_s(self) -> float:
        text = (REPORTS / SERIES / self.file).read_text()
        (value,) = re.findall(rf"^{re.escape(self.label)} rc=0 wall_s=([\d.]+)$", text, flags=re.M)
        return float(value)


@dataclass(frozen=True)
class Notes:
    """A cell of the table in a run's NOTES.md: the row whose first cell starts so, the column so named."""

    run: str
    row: str
    column: str

    def wall_s(self) -> float:
        (table,) = tables(REPORTS / self.run / "NOTES.md")
        row = next(r for r in table.rows if r[0].startswith(self.row))
        return float(row[table.column(self.column)])


@dataclass(frozen=True)
class Case:
    """A case of the table: its run directory, its key where the run has several cases, its end-to-end wall."""

    run: str
    key: str | None = None
    wall: Timings | Notes | None = None

    @property
    def result(self) -> CaseResult:
        return record(self.run, self.key)


def _series(folder: str, timings: str, label: str) -> Case:
    return Case(f"{SERIES}/{folder}", wall=Timings(timings, label))


WARM_CACHE = "ci-warm-cache-h200-20261203-160658"
PROBE_WARM = "ci-probe-fell-back-warm-h200-20261203-181139"
BF16, FP8 = "dev-eager-aa86698a7da0", "dev-eager-95f2251ca82c"
ROWS = {  # the row's first cell -> its cases, in the order its lists name them
    "`ci.yaml`, no cache (before)": [Case("ci-local-h200-20261203-145616",
                                          wall=Notes(WARM_CACHE, "`flux2bench run` wall s", "earlier today"))],
    "`ci.yaml`, cold cache, fresh workers": [Case("ci-cold-cache-h200-20261203-160609",
                                                  wall=Notes(WARM_CACHE, "`flux2bench run` wall s", "cold"))],
    "`ci.yaml`, warm cache, fresh workers": [Case(WARM_CACHE, wall=Notes(WARM_CACHE, "`flux2bench run` wall s",
                                                                         "warm"))],
    "`ci.yaml`, cold, fork server refused by its probe, no report": [
        Case("ci-probe-fell-back-cold-h200-20261203-181042",
             wall=Notes(PROBE_WARM, "`ci-probe-fell-back-cold", "end-to-end s"))],
    "`ci.yaml`, warm, fork server refused by its probe, no report": [
        Case(PROBE_WARM, wall=Notes(PROBE_WARM, "this directory", "end-to-end s"))],
    "`ci.yaml`, cold, fork server started after the command's imports": [_series("1-cold", "timings-1.txt", "ci-cold")],
    "`ci.yaml`, warm, the same (2 runs)": [_series("1-warm", "timings-1.txt", "ci-warm"),
                                           _series("1-warm2", "timings-1.txt", "ci-warm2")],
    "`ci.yaml`, cold, fork server started before them (2 runs)": [_series("2-cold", "timings-2.txt", "ci-cold"),
                                                                   _series("3-cold", "timings-3.txt", "ci-cold")],
    "`ci.yaml`, warm, the same (7 runs)": [
        *(_series(f"2-{name}", "timings-2.txt", f"ci-{name}") for name in ("warm", "warm2", "warm3")),
        *(_series(f"3-warm-fork-server-{n}", "timings-3.txt", f"ci-warm-F{n}") for n in range(1, 5))],
    "`ci.yaml`, warm, fresh workers, same machines (4 runs)": [
        _series("1-warm-fresh", "timings-1.txt", "ci-fresh"),
        *(_series(f"3-warm-fresh-{n}", "timings-3.txt", f"ci-warm-f{n}") for n in range(1, 4))],
    "FLUX.2-dev bf16 eager (before)": [Case("overhead-20261203-161227", BF16)],
    "FLUX.2-dev FP8 eager (before)": [Case("overhead-20261203-161227", FP8)],
    "FLUX.2-dev bf16 eager, FP8 load on the GPU": [Case("overhead-h200-20261203-181247", BF16)],
    "FLUX.2-dev FP8 eager, FP8 load on the GPU": [Case("overhead-h200-20261203-181247", FP8)],
    "FLUX.2-dev bf16 eager, fork server": [Case("overhead-fork-server-h200-20261203-194132", BF16)],
    "FLUX.2-dev FP8 eager, fork server": [Case("overhead-fork-server-h200-20261203-194132", FP8)],
}


def imports_s(case: Case) -> float | None:
    """The worker's own imports, or, for a worker forked from the fork server, the server's (once per run)."""
    result = case.result
    if result.wall_split is None:
        return None
    if result.wall_split.worker_start != "fork-server":
        return result.wall_split.imports_s
    (server,) = [s for s in run(case.run).meta["fork_server"] if s.get("usable")]
    return server["imports_s"]


def worker_wall_s(case: Case) -> float | None:
    """The runner's wall of the case's worker (in the record's top level before the wall split existed)."""
    result = case.result
    return result.wall_split.worker_wall_s if result.wall_split else result.wall_s


def timed_s(case: Case) -> float:
    return sum(case.result.latency.stages["image"])


def _split(part: str):
    return lambda case: getattr(case.result.wall_split, part) if case.result.wall_split else None


COLUMNS = {  # the column's header -> the value of one case
    "imports": imports_s,
    "waited": _split("process_start_s"),
    "load": lambda case: case.result.wall_split.load_s if case.result.wall_split else case.result.latency.load_s,
    "prompt-embedding worker": _split("artifacts_s"),
    "GPU-s held per timed GPU-s": lambda case: BY_NAME["gpu_s_per_timed_s"].value(case.result),
}


def named_runs(cell: str) -> list[str]:
    """The run directories (or patterns of them, ``3-warm-fresh-*``) a cell names, by their last path component."""
    return [Path(name).name for name in re.findall(r"`([^`]+)`", cell)]


def _table():
    return table_with(OVERHEAD, "run", "end-to-end wall s", "worker wall / timed s")


def test_every_row_of_the_overhead_table_has_its_cases_named_here():
    assert [row[0] for row in _table().rows] == list(ROWS)


@pytest.mark.parametrize("name", ROWS)
def test_an_overhead_row_is_its_records(name):
    table = _table()
    row = next(r for r in table.rows if r[0] == name)
    cases = ROWS[name]
    named = named_runs(row[-1])  # the last column names the runs (the first, also "run", describes the row)
    assert all(any(fnmatch(Path(case.run).name, pattern) for pattern in named) for case in cases), \
        f"{name}: the row names {row[-1]}"
    assert all(case.result.status == "ok" for case in cases)
    wall = row[table.column("end-to-end wall s")]
    assert bool(wall) == all(case.wall for case in cases), f"{name}: an end-to-end wall without its timing"
    if wall:
        check(wall, [case.wall.wall_s() for case in cases], f"{name}: end-to-end wall")
    worker, timed = row[table.column("worker wall / timed s")].split(" / ")
    check(worker, [worker_wall_s(case) for case in cases], f"{name}: worker wall")
    check(timed, [timed_s(case) for case in cases], f"{name}: timed")
    for column, value in COLUMNS.items():
        check(row[table.column(column)], [value(case) for case in cases], f"{name}: {column}")
