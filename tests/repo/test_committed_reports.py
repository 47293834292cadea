"""Every committed run directory re-reports with this version, to the numbers its committed report.csv holds.

Records written by earlier versions must load; a column whose meaning did not change must hold the same values;
a column that was renamed or split is mapped explicitly below (``SPLIT_BY_PHASE``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flux2bench.metrics import PHASES, of_kind
from flux2bench.report import build_report

from conftest import REPO

REPORTS = REPO / "reports"
RUN_DIRS = sorted(path.parent.relative_to(REPORTS) for path in REPORTS.rglob("run.json"))
# Reports of earlier versions showed one memory column per metric, the larger of the load and inference peaks; this
# version shows one per phase, so the old column is the larger of the two new ones.
SPLIT_BY_PHASE = {spec.header: [spec.phase_header(phase) for phase in PHASES] for spec in of_kind("memory")}
NOT_COMPARED = {"notes"}  # reasons, reworded freely; the numbers are what must not change


def test_every_committed_run_directory_is_covered():
    assert len(RUN_DIRS) >= 40 and Path("h100-20261126-111007") in RUN_DIRS


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, na_values=["n/a"], keep_default_na=False, dtype=str).set_index("key")


def _numbers(column: pd.Series) -> pd.Series:
    return pd.to_numeric(column, errors="coerce")


def _larger(columns: list[pd.Series]) -> pd.Series:
    return pd.concat([_numbers(c) for c in columns], axis=1).max(axis=1, skipna=True)


def _same(before: pd.Series, after: pd.Series) -> bool:
    numeric_before, numeric_after = _numbers(before), _numbers(after)
    if numeric_before.notna().any() or numeric_after.notna().any():
        return np.allclose(numeric_before, numeric_after, rtol=1e-12, atol=0, equal_nan=True)
    as_text = [side.astype(object).where(side.notna(), "n/a").tolist() for side in (before, after)]
    return as_text[0] == as_text[1]


@pytest.mark.parametrize("run", RUN_DIRS, ids=str)
def test_a_committed_run_re_reports_to_the_same_numbers(tmp_path, run):
    committed = REPORTS / run
    copy = tmp_path / "run"
    shutil.copytree(committed, copy, ignore=shutil.ignore_patterns("*.html", "*.png", "*.md", "*.csv", "logs",
                                                                   "timelines", "plots"))
    built = build_report(copy, plots=False)
    assert built.markdown.is_file() and built.html.is_file()
    if not (committed / "report.csv").is_file():
        return  # a run committed without its report (the gate's evidence): re-reporting without error is the test
    before, after = _read(committed / "report.csv"), _read(built.csv)
    assert list(after.index) == list(before.index)
    for name in before.columns.difference(list(NOT_COMPARED)):
        if name in SPLIT_BY_PHASE:
            now = _larger([after[h] for h in SPLIT_BY_PHASE[name] if h in after]) if any(
                h in after for h in SPLIT_BY_PHASE[name]) else pd.Series(np.nan, index=after.index)
        else:
            assert name in after, f"column {name!r} of the committed report is gone"
            now = after[name]
        assert _same(before[name], now), f"{run}: column {name!r} changed"
