"""A refused command changes nothing: every refusal is decided before the first write, so the run directory (and
every output file named) is exactly as it was, and the refusal is one line with exit code 2."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flux2bench.cli import app
from flux2bench.store import RunStore
from runs import make_case, make_run

TINY = """
defaults: {model: tiny, device: cpu, resolution: 64, steps: 1, repeats: 1, warmup: 0}
blocks:
  main: {}
"""


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exc_info is None or result.exc_info[0] is SystemExit, result.exc_info
    return result.exit_code, " ".join(result.output.split())


def snapshot(folder: Path) -> dict[Path, bytes | None]:
    return {path: path.read_bytes() if path.is_file() else None for path in sorted(folder.rglob("*"))}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run_dir = make_run(tmp_path, "run", [make_case("main-1", image_s=[1.0, 1.1, 0.9])])
    (run_dir / "scenario.yaml").write_text(textwrap.dedent(TINY))
    return run_dir


@pytest.mark.parametrize("options", [[], ["--drift-only"], ["--retry-failed"], ["--block", "main"]])
def test_a_resume_of_a_run_in_use_is_refused_before_it_writes_anything(run_dir, options):
    with RunStore(run_dir).locked():  # another runner holds it
        before = snapshot(run_dir)
        code, output = invoke("run", "--resume", run_dir, "--no-report", *options)
        assert snapshot(run_dir) == before  # no "resumed" entry in run.json, no folder made
    assert code == 2 and f"{run_dir} is in use by another flux2bench run" in output
    assert output.count("error:") == 1 and "Traceback" not in output


def test_the_refused_resume_leaves_the_run_resumable_as_it_was(run_dir):
    with RunStore(run_dir).locked():
        invoke("run", "--resume", run_dir, "--no-report")
    assert "resumed" not in RunStore(run_dir).meta


@pytest.mark.parametrize("same", ["json-and-markdown", "json-and-rules"])
def test_compare_with_two_options_naming_one_file_writes_nothing(run_dir, tmp_path, same):
    out = tmp_path / "out.txt"
    rules = tmp_path / "gate.yaml"
    rules.write_text("defaults: {}\n")
    args = {"json-and-markdown": ["--json", out, "--markdown", out],
            "json-and-rules": ["--json", rules, "--rules", rules]}[same]
    code, output = invoke("compare", run_dir, run_dir, *args)
    assert code == 2 and "give each output a file of its own" in output
    assert not out.exists() and rules.read_text() == "defaults: {}\n"


def test_a_report_refused_for_an_unknown_timeline_case_writes_nothing(run_dir):
    before = snapshot(run_dir)
    code, output = invoke("report", run_dir, "--timeline-case", "nope")
    assert code == 2 and "no case has the key or label 'nope'" in output
    assert snapshot(run_dir) == before  # not even an empty plots/ folder


def test_a_run_refused_for_its_environment_makes_no_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "abc")
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(textwrap.dedent(TINY))
    code, output = invoke("run", scenario, "--out", tmp_path / "runs")
    assert code == 2 and "OMP_NUM_THREADS='abc' is not a number of threads" in output
    assert output.count("error:") == 1 and not (tmp_path / "runs").exists()
