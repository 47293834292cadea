"""The command line: plan prints the expansion; bad input exits 2 with one message and leaves nothing behind; run's
exit code says whether every case was measured."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner

from flux2bench import __version__
from flux2bench.cli import app
from flux2bench.results import CaseResult, Status
from flux2bench.runner import start_run
from flux2bench.scenario import load_cases
from conftest import REPO
from runs import make_case, make_run


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


def test_plan_piped_keeps_each_case_on_one_line_whatever_its_width(write_scenario):
    path = write_scenario(GOOD.replace("main:", "a-block-name-long-enough-to-push-its-row-well-past-eighty-columns:"))
    lines = CliRunner().invoke(app, ["plan", str(path)]).output.splitlines()
    for case in load_cases(path):
        (row,) = [line for line in lines if case.key in line]
        assert case.block in row and case.label in row and len(row) > 80


def test_plan_says_what_each_case_needs_of_the_machine(write_scenario):
    path = write_scenario("defaults: {model: tiny, resolution: 64, steps: 1}\nblocks:\n  cpu: {device: cpu}\n"
                          "  auto: {}\n  split: {device: cuda, parallel: ulysses, gpus: 2}\n"
                          "  kind: {gpu: H100}\n")
    lines = CliRunner().invoke(app, ["plan", str(path)]).output.splitlines()
    needs = {case.block: [line for line in lines if case.key in line][0].split("│")[4].strip()
             for case in load_cases(path)}
    assert needs == {"cpu": "CPU", "auto": "1 GPU, else the CPU", "split": "2 GPUs of one host", "kind": "1 H100"}


def test_plan_says_that_run_adds_a_drift_baseline_for_cases_that_change_numerics(invoke, write_scenario):
    path = write_scenario("defaults: {model: tiny, resolution: 64, steps: 1}\nblocks:\n  plain: {}\n"
                          "  math: {attention: _native_math}\n  unjudged: {attention: _native_math, "
                          "drift_baseline: off}\n")
    output = " ".join(invoke("plan", path)[1].split())
    assert ("1 of these changes numerics: run compares their images with a bf16 drift baseline of the same workload, "
            "and runs one (block <block>.baseline) where the run has none") in output
    assert "numerics" not in " ".join(invoke("plan", path, "--block", "plain")[1].split())


def test_plan_of_some_blocks_prints_only_their_cases_and_names_an_unknown_block(invoke, write_scenario):
    path = write_scenario(GOOD)
    code, output = invoke("plan", path, "--block", "refs")
    assert code == 0 and ": 1 case " in output and "refs=2" in output and "128x128" not in output
    code, output = invoke("plan", path, "--block", "nope")
    assert code == 2 and "no block named nope; blocks are main, refs" in output


def test_plan_of_a_run_directory_shows_each_cases_state_and_what_resume_would_run(invoke, write_scenario,
                                                                                  out_dir):
    store, cases = start_run(write_scenario(GOOD), out_root=out_dir)
    store.write(CaseResult.for_case(cases[0], Status.OOM, reason="CUDA out of memory"))
    code, output = invoke("plan", "--resume", store.root)
    assert code == 0 and re.search(rf"{cases[0].key} │ oom", output) and re.search(rf"{cases[1].key} │ to run", output)
    assert "1 finished, 2 to run: flux2bench run --resume" in output


def test_resuming_a_run_on_another_gpu_model_warns_that_it_will_hold_two(invoke, write_scenario, out_dir,
                                                                         monkeypatch):
    import flux2bench.runner.run_dir as run_dir
    monkeypatch.setattr(run_dir, "capture_environment", lambda label: {"gpu_name": "NVIDIA H200"})
    store, _ = start_run(write_scenario(GOOD), out_root=out_dir)
    monkeypatch.setattr(run_dir, "capture_environment", lambda label: {"gpu_name": "NVIDIA H100 80GB HBM3"})
    code, output = invoke("run", "--resume", store.root, "--drift-only", "--no-report")
    assert "warning: this run was created on NVIDIA H200 and now runs on NVIDIA H100 80GB HBM3" in output
    same, _ = start_run(write_scenario(GOOD), out_root=out_dir / "same")
    assert "warning" not in invoke("run", "--resume", same.root, "--drift-only", "--no-report")[1]


def test_plan_needs_a_scenario_or_a_run_directory_and_names_a_folder_that_is_not_one(invoke, write_scenario,
                                                                                     tmp_path):
    assert invoke("plan")[0] == 2
    code, output = invoke("plan", "--resume", tmp_path)
    assert code == 2 and "is not a flux2bench run directory" in output


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


@pytest.mark.parametrize("given, meant", [("smoke", "scenarios/smoke.yaml"), ("scenarios/smok", "scenarios/smoke.yaml"),
                                          ("scenarios/smoke.yml", "scenarios/smoke.yaml")])
def test_a_missing_scenario_file_names_the_shipped_one_meant(invoke, given, meant, monkeypatch):
    monkeypatch.chdir(REPO)
    code, output = invoke("plan", given)
    assert code == 2 and f"{given}: no such file; did you mean {meant}?" in output


def test_a_report_of_a_path_that_is_not_there_or_holds_run_directories_says_which(invoke, tmp_path, tiny_run):
    code, output = invoke("report", tmp_path / "nope")
    assert code == 2 and f"{tmp_path / 'nope'}: no such directory" in output
    code, output = invoke("report", tiny_run.store.root.parent)
    assert code == 2 and f"it holds run directories, e.g. {tiny_run.store.root.parent}/" in output


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


def test_plan_and_run_refuse_a_scenario_beyond_max_cases_and_name_the_override(invoke, write_scenario, out_dir):
    path = write_scenario(GOOD)
    for command in ("plan", "run"):
        code, output = invoke(command, path, "--max-cases", 2, *(["--out", out_dir] if command == "run" else []))
        assert code == 2
        assert "expand to 3 cases" in output and "--max-cases 3" in output
    assert list(out_dir.iterdir()) == []
    assert invoke("plan", path, "--max-cases", 3)[0] == 0


def test_version_prints_the_package_version(invoke):
    assert invoke("--version") == (0, f"flux2bench {__version__}")


@pytest.mark.parametrize("command", [None, "plan", "run", "report", "compare", "export"])
def test_help_shows_every_option_name_whole_when_output_is_not_a_terminal(command):
    group = get_command(app)
    target = group.commands[command] if command else group
    output = CliRunner().invoke(app, [*filter(None, [command]), "--help"], env={"COLUMNS": None}).output
    words = set(re.split(r"[\s/,]+", output))
    for param in target.params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("-"):
                assert name in words, f"{name} is cut in:\n{output}"


# --- run: where the output goes and what the exit code says ---------------------------------------------------

def test_runs_go_to_runs_by_default_which_git_ignores():
    (out,) = [param for param in get_command(app).commands["run"].params if param.name == "out"]
    assert out.default == Path("runs")
    assert "/runs/" in (REPO / ".gitignore").read_text().splitlines()


@pytest.mark.skipif(torch.cuda.is_available(), reason="scenarios/ci.yaml runs on a CUDA GPU")
def test_a_scenario_this_machine_cannot_run_exits_3_before_writing_anything(invoke, out_dir):
    code, output = invoke("run", REPO / "scenarios" / "ci.yaml", "--out", out_dir)
    assert code == 3 and "this machine cannot run any case still to run (1 case: device: cuda" in output
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_a_run_that_measured_nothing_exits_3_with_a_summary_and_the_report_paths(invoke, write_scenario, out_dir):
    scenario = write_scenario("defaults: {model: tiny, device: cpu, resolution: 64, steps: 1, timeout_s: 120, "
                              "gpus: 2}\nblocks:\n  main: {}\n")
    code, output = invoke("run", scenario, "--out", out_dir)
    (run_dir,) = out_dir.iterdir()
    assert code == 3
    assert "unsupported tiny bf16" in output and "gpus: 2 needs parallel" in output
    assert "1 case: 1 unsupported" in output
    assert f"report: {run_dir / 'report.html'} and {run_dir / 'report.md'}" in output
    assert "# flux2bench report" not in output  # the summary, not all of report.md


def test_out_that_is_a_file_exits_2_and_creates_nothing(invoke, write_scenario, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for out in (taken, taken / "below"):
        code, output = invoke("run", write_scenario(GOOD), "--out", out)
        assert code == 2
        assert f"--out {out}: {taken} is a file, not a folder" in output
    assert taken.read_text() == "a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder")
def test_out_in_a_folder_that_cannot_be_written_exits_2_and_creates_nothing(invoke, write_scenario, out_dir):
    out_dir.chmod(0o500)
    try:
        code, output = invoke("run", write_scenario(GOOD), "--out", out_dir / "runs")
    finally:
        out_dir.chmod(0o700)
    assert code == 2
    assert f"--out {out_dir / 'runs'}: {out_dir} cannot be written" in output
    assert list(out_dir.iterdir()) == []


# --- report, compare, export: bad run directories and outputs -------------------------------------------------

@pytest.fixture
def finished_run(tmp_path) -> Path:
    return make_run(tmp_path, "finished", [make_case("main-1", image_s=[1.0, 1.1, 0.9])])


@pytest.mark.parametrize("text, problem", [("{not json", "unreadable run description"),
                                           ("[1, 2]", "expected a JSON object")], ids=["not-json", "not-an-object"])
@pytest.mark.parametrize("command", ["report", "compare", "export", "resume"])
def test_a_malformed_run_json_exits_2_naming_the_file(invoke, tmp_path, finished_run, text, problem, command):
    damaged = tmp_path / "damaged"
    (damaged / "results").mkdir(parents=True)
    (damaged / "run.json").write_text(text)
    args = {"report": ["report", damaged], "compare": ["compare", damaged, finished_run],
            "export": ["export", damaged], "resume": ["run", "--resume", damaged]}[command]
    code, output = invoke(*args)
    assert code == 2
    assert f"{damaged / 'run.json'}: {problem}" in output
    assert output.count("error:") == 1 and "Traceback" not in output


def test_report_with_an_unknown_timeline_case_exits_2(invoke, finished_run):
    code, output = invoke("report", finished_run, "--timeline-case", "nope")
    assert code == 2
    assert "error: no case has the key or label 'nope'" in output


def test_compare_of_runs_without_a_case_in_common_exits_2(invoke, tmp_path, finished_run):
    other = make_run(tmp_path, "other-scenario", [make_case("other-1", image_s=[1.0, 1.1, 0.9])])
    code, output = invoke("compare", finished_run, other)
    assert code == 2
    assert "the runs have no case in common (runs of different scenarios?)" in output


@pytest.mark.parametrize("option", ["--json", "--markdown"])
def test_compare_output_that_cannot_be_written_exits_2_before_printing_a_verdict(invoke, tmp_path, finished_run,
                                                                                 option):
    code, output = invoke("compare", finished_run, finished_run, option, tmp_path)
    assert code == 2
    assert f"error: {option} {tmp_path}: cannot write: Is a directory" in output
    assert "flux2bench gate" not in output and "Traceback" not in output


def test_report_prints_where_it_wrote_and_a_short_summary_not_the_markdown(invoke, finished_run):
    code, output = invoke("report", finished_run)
    assert code == 0
    assert "Measured: 1 case of 1 workload" in output and "fastest, tiny (synthetic weights)" in output
    assert f"report written to {finished_run / 'report.html'}" in output
    assert "## Results" not in output and len(output) < 1000


def test_a_price_for_a_gpu_no_case_ran_on_is_an_error_naming_the_gpus_that_did(invoke, finished_run):
    code, output = invoke("report", finished_run, "--price", "A100=1.2")
    assert code == 2
    assert "--price A100: no case of this run ran on such a GPU; its cases ran on NVIDIA H100 80GB HBM3" in output
    assert invoke("report", finished_run, "--price", "H100=2.5")[0] == 0


def test_two_prices_for_one_gpu_are_an_error_not_a_silent_choice(invoke, finished_run):
    code, output = invoke("report", finished_run, "--price", "H100=2.5", "--price", "H100=3")
    assert code == 2 and "--price 'H100=3': H100 has a price already (2.5 USD per hour); give one each" in output


def test_plan_never_cuts_a_key_however_narrow_the_terminal(write_scenario):
    path = write_scenario(GOOD)
    output = CliRunner().invoke(app, ["plan", str(path)], env={"COLUMNS": "40"}).output
    for case in load_cases(path):
        assert case.key in output


def test_plan_keys_prints_one_key_per_line(write_scenario):
    path = write_scenario(GOOD)
    result = CliRunner().invoke(app, ["plan", str(path), "--keys"])
    assert result.exit_code == 0 and result.output.splitlines() == [case.key for case in load_cases(path)]


# --- outputs: one rule for every file a command is asked to write -------------------------------------------------

OUTPUTS = {"export": ["export", "{run}", "--output"], "compare --json": ["compare", "{run}", "{run}", "--json"],
           "compare --markdown": ["compare", "{run}", "{run}", "--markdown"], "history --json": ["history", "{run}",
                                                                                                 "--json"]}


@pytest.mark.parametrize("command", OUTPUTS)
def test_an_output_file_gets_the_folders_it_lacks(invoke, tmp_path, finished_run, command):
    out = tmp_path / "new" / "deeper" / "out.json"
    code, output = invoke(*[part.format(run=finished_run) for part in OUTPUTS[command]], out)
    assert code == 0, output
    assert out.is_file() and out.read_text()


@pytest.mark.parametrize("command", OUTPUTS)
def test_an_output_below_a_file_is_refused_naming_that_file_before_anything_is_printed(tmp_path, finished_run,
                                                                                        command):
    taken = tmp_path / "taken.txt"
    taken.write_text("a file")
    out = taken / "out.json"
    result = CliRunner().invoke(app, [part.format(run=finished_run) for part in OUTPUTS[command]] + [str(out)])
    option = OUTPUTS[command][-1]
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"error: {option} {out}: {taken} is a file, not a folder"]
    assert taken.read_text() == "a file"


def test_history_refuses_an_output_it_cannot_write_before_printing_the_history(tmp_path, finished_run):
    result = CliRunner().invoke(app, ["history", str(finished_run), "--json", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"error: --json {tmp_path}: cannot write: Is a directory"]


# --- report of a run without a valid record --------------------------------------------------------------------

def test_report_of_a_run_without_a_valid_record_warns_and_says_nothing_of_a_device(invoke, finished_run):
    """The run's host had an H100 (run.json), but no record says where a case ran: neither "GPU" nor "the CPU"."""
    (record,) = (finished_run / "results").glob("*.json")
    record.write_bytes(b"\x00\xff not a record")
    code, output = invoke("report", finished_run)
    assert code == 0
    assert (f"warning: the run {finished_run} is incomplete: 1 case(s) without a result; 1 record(s) set aside as "
            "invalid (report.md names them)") in output
    assert f"set aside as invalid: results/{record.name}" in (finished_run / "report.md").read_text()
    intro = next(line for line in (finished_run / "report.md").read_text().splitlines() if line.startswith("Scenario"))
    assert "no case measured yet (the host's GPU: NVIDIA H100 80GB HBM3)" in intro
    assert "on the CPU" not in intro and "was not used" not in intro and "GPU: NVIDIA H100 80GB HBM3," not in intro
    page = html.unescape((finished_run / "report.html").read_text())
    assert "no case measured yet (the host's GPU: NVIDIA H100 80GB HBM3)" in page and "on the CPU" not in page
