"""What the repository ships stays readable by this version: every scenario file validates and expands, and every
committed run directory's records load (they are the evidence README cites)."""

from __future__ import annotations


import pytest

from flux2bench.scenario import load_cases
from flux2bench.store import RunStore

from conftest import REPO

SCENARIOS = sorted((REPO / "scenarios").glob("*.yaml"))
RUN_DIRS = sorted(results.parent for results in (REPO / "reports").glob("**/results"))


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_every_shipped_scenario_expands_into_cases(path):
    cases = load_cases(path)
    assert cases and len({case.key for case in cases}) == len(cases)


@pytest.mark.parametrize("run_dir", RUN_DIRS, ids=lambda p: str(p.relative_to(REPO / "reports")))
def test_every_committed_record_loads(run_dir):
    records = RunStore.open(run_dir).records()
    assert not records.invalid
    assert len(records.valid) == len(list((run_dir / "results").glob("*.json")))


def test_the_committed_evidence_is_found():
    assert len(SCENARIOS) >= 7 and len(RUN_DIRS) >= 20
