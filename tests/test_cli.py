"""The command line: plan prints the expansion; bad input exits 2 with one message and leaves nothing behind."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flux2bench.cli import app
from flux2bench.scenario import load_cases

GOOD = """
defaults:
  model: tiny
  device: cpu
blocks:
  main:
    steps: [2, 4]
    resolution: 128
  refs:
    reference_images: 2
"""
BAD = """
blocks:
  main:
    model: tiny
    steps: many
"""


@pytest.fixture
def invoke():
    """``invoke(*args)``: the CLI's exit code and its output (stdout and stderr) with whitespace runs collapsed,
    since rich wraps long lines wherever the terminal width falls."""
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, [str(a) for a in args])
        return result.exit_code, " ".join(result.output.split())

    return run


@pytest.fixture
def out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_plan_prints_every_case_with_its_block_label_and_key(invoke, write_scenario):
    path = write_scenario(GOOD)
    code, output = invoke("plan", path)
    assert code == 0
    assert "3 cases" in output
    for case in load_cases(path):
        assert case.key in output
    assert "tiny bf16 offload=none sdpa 128x128 4steps" in output


@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_bad_scenario_exits_2_with_one_message_and_no_traceback(invoke, write_scenario, out_dir, command):
    path = write_scenario(BAD)
    code, output = invoke(command, path, *(["--out", out_dir] if command == "run" else []))
    assert code == 2
    assert output.count("error:") == 1
    assert f"{path}, block 'main', field 'steps" in output
    assert "Traceback" not in output


def test_a_bad_scenario_creates_no_run_directory(invoke, write_scenario, out_dir):
    code, _ = invoke("run", write_scenario(BAD), "--out", out_dir)
    assert code == 2
    assert list(out_dir.iterdir()) == []


def test_a_missing_scenario_file_exits_2(invoke, tmp_path, out_dir):
    code, output = invoke("run", tmp_path / "nope.yaml", "--out", out_dir)
    assert code == 2
    assert "no such file" in output and "Traceback" not in output
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("args", [[], ["SCENARIO", "--resume", "RUN_DIR"]], ids=["neither", "both"])
def test_run_needs_exactly_one_of_scenario_and_resume(invoke, write_scenario, tmp_path, args):
    values = {"SCENARIO": str(write_scenario(GOOD)), "RUN_DIR": str(tmp_path)}
    code, output = invoke("run", *[values.get(a, a) for a in args])
    assert code == 2
    assert "give a scenario file, or --resume RUN_DIR" in output


@pytest.mark.parametrize("devices", ["0,0", "0,,1", ""])
def test_bad_devices_exit_2_before_a_run_directory_is_made(invoke, write_scenario, out_dir, devices):
    code, output = invoke("run", write_scenario(GOOD), "--out", out_dir, "--devices", devices)
    assert code == 2
    assert "expected distinct comma-separated GPU indices or UUIDs" in output
    assert list(out_dir.iterdir()) == []


def test_resuming_a_folder_that_is_not_a_run_exits_2(invoke, tmp_path):
    code, output = invoke("run", "--resume", tmp_path)
    assert code == 2
    assert "not a flux2bench run directory" in output and "Traceback" not in output
