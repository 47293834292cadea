"""constraints/ pins the exact versions of the libraries the committed runs used (their run.json), one file per
environment, and README installs each: with them a fresh run can be compared with a committed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flux2bench.trackers.environment import PIPELINE_LIBRARIES

from conftest import REPO

ROOT = REPO
CONSTRAINTS = {"gpu": ROOT / "constraints" / "gpu-torch2.11-cu130.txt",
               "cpu": ROOT / "constraints" / "cpu-torch2.13.txt"}
RUNS = sorted(ROOT.glob("reports/**/run.json"))


def pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.split("==") for line in lines if line)


def _environment(run_json: Path) -> dict:
    return json.loads(run_json.read_text())["environment"]


@pytest.mark.parametrize("run_json", RUNS, ids=lambda path: str(path.parent.relative_to(ROOT / "reports")))
def test_a_committed_run_used_the_pinned_versions_of_its_environment(run_json):
    environment = _environment(run_json)
    pinned = pins(CONSTRAINTS["gpu" if environment.get("gpu_name") else "cpu"])
    recorded = environment["versions"]
    assert {name: recorded[name] for name in pinned if recorded.get(name)} == \
        {name: version for name, version in pinned.items() if recorded.get(name)}


def test_each_environment_has_committed_runs_and_pins_every_library_compare_checks():
    kinds = {"gpu" if _environment(path).get("gpu_name") else "cpu" for path in RUNS}
    assert kinds == set(CONSTRAINTS)
    for path in CONSTRAINTS.values():
        assert set(PIPELINE_LIBRARIES) <= set(pins(path)), path.name


def test_readme_installs_each_constraints_file():
    readme = (ROOT / "README.md").read_text()
    for path in CONSTRAINTS.values():
        name = path.relative_to(ROOT)
        assert f"pip install -r {name}" in readme and f"-c {name}" in readme
