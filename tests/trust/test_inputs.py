"""Every input is read as strictly as a scenario: gate rules through the scenarios' loader (no duplicate key, bounded
nesting, typed finite numbers), scenario values no run could use refused at validation, the process environment
checked before a run starts, and user text (paths, names) printed literally, never as markup or emoji."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flux2bench.axes.batch import MAX_SEED
from flux2bench.cli import app
from flux2bench.compare import CompareError, load_rules
from flux2bench.scenario import ScenarioError, load_cases
from runs import make_case, make_run

TINY = "model: tiny, device: cpu, resolution: 64, steps: 1, repeats: 1, warmup: 0"


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exc_info is None or result.exc_info[0] is SystemExit, result.exc_info
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize("text, problem", [
    ("defaults:\n  s_per_image: {threshold: 0.1}\n  s_per_image: {threshold: 9}\n", "duplicate key 's_per_image'"),
    ("defaults: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("defaults: " + "{a: " * 40 + "1" + "}" * 40 + "\n", "nested more than 32"),
    ("defaults:\n  s_per_image: {threshold: .inf}\n", "defaults.s_per_image.threshold: Input should be a finite number"),
    ("defaults:\n  s_per_image: {threshold: .nan}\n", "defaults.s_per_image.threshold: Input should be a finite number"),
    ("defaults:\n  s_per_image: {threshold: '0.1'}\n", "defaults.s_per_image.threshold: Input should be a valid number"),
    ("defaults:\n  s_per_image: {enabled: off}\n", "defaults.s_per_image.enabled: Input should be a valid boolean"),
    ("fail_on_improvement: 1\n", "fail_on_improvement: Input should be a valid boolean"),
], ids=["duplicate-key", "deep-lists", "deep-mappings", "infinite", "nan", "text-number", "yaml-1.1-off", "int-bool"])
def test_gate_rules_are_read_as_strictly_as_scenarios(tmp_path, text, problem):
    rules = tmp_path / "gate.yaml"
    rules.write_text(text)
    with pytest.raises(CompareError, match=f"(?s)gate rules.*{problem}"):
        load_rules(rules)
    run = make_run(tmp_path, "run", [make_case("main-1", image_s=[1.0, 1.1, 0.9])])
    code, output = invoke("compare", run, run, "--rules", rules)
    assert code == 2 and output.count("error:") == 1 and "Traceback" not in output


@pytest.mark.parametrize("body, field, problem", [
    (f"seeds: {MAX_SEED}, batch_size: 2", "seeds", f"makes image seed {MAX_SEED + 1}"),
    (f"seeds: [0, {MAX_SEED - 2}], batch_size: 4", "seeds", "use seeds at most"),
    ("batch_size: 1e12", "batch_size", "less than or equal to 4096"),
    ("batch_size: 1000000000000", "batch_size", "less than or equal to 4096"),
    ("repeats: 1000000000", "repeats", "less than or equal to 1000"),
    ("guidance_scale: .inf", "guidance_scale", "finite number"),
    ("timeout_s: .inf", "timeout_s", "finite number"),
    ("drift: {min_psnr: .nan}", "drift.min_psnr", "finite number"),
    ("gpu: [H100, h100]", "gpu", "in other letter cases"),
    ("gpu: H100, device: cpu", "gpu", "but device: cpu runs the case on the CPU"),
], ids=["seed-overflow", "seed-overflow-second", "batch-float", "batch-huge", "repeats-huge", "guidance-inf",
        "timeout-inf", "drift-nan", "gpu-twice", "gpu-on-cpu"])
def test_scenario_values_no_run_could_use_are_refused_at_validation(write_scenario, tmp_path, body, field, problem):
    scenario = write_scenario(f"defaults: {{{TINY}}}\nblocks:\n  main: {{{body}}}\n")
    with pytest.raises(ScenarioError, match=rf"block 'main'.*{field}.*{problem}"):
        load_cases(scenario)
    code, output = invoke("run", scenario, "--out", tmp_path / "runs")
    assert code == 2 and problem in output and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("threads", ["abc", "0", "-2", "4,2", ""])
def test_an_unusable_thread_count_is_refused_before_the_run(write_scenario, tmp_path, monkeypatch, threads):
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    code, output = invoke("run", write_scenario(f"blocks:\n  main: {{{TINY}}}\n"), "--out", tmp_path / "runs")
    assert code == 2 and f"OMP_NUM_THREADS={threads!r}" in output and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["d[/]", "a:thumbsup:b", "[bold]x[/bold]"])
def test_paths_and_names_are_printed_literally(write_scenario, tmp_path, name):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    scenario = folder / "s.yaml"
    scenario.write_text(f"blocks:\n  main: {{{TINY}}}\n")
    code, output = invoke("plan", scenario)
    assert code == 0 and str(scenario) in output
    code, output = invoke("plan", folder / "missing.yaml")
    assert code == 2 and str(folder / "missing.yaml") in output and "👍" not in output
    code, output = invoke("report", folder)
    assert code == 2 and str(folder) in output and "Traceback" not in output


def test_invalid_gate_rules_give_each_problem_a_line_with_its_location_and_no_empty_one(tmp_path):
    rules = tmp_path / "gate.yaml"
    rules.write_text("defaults:\n  s_per_step: {threshold: .nan, alpha: 5}\nblocks:\n"
                     "  main: {s_per_image: {threshold: -1}}\n")
    run = make_run(tmp_path, "run", [make_case("main-1", image_s=[1.0, 1.1, 0.9])])
    result = CliRunner().invoke(app, ["compare", str(run), str(run), "--rules", str(rules)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"error: invalid gate rules {rules}:",
        "  defaults.s_per_step.threshold: Input should be a finite number",
        "  defaults.s_per_step.alpha: Input should be less than 1",
        "  blocks.main.s_per_image.threshold: Input should be greater than or equal to 0"]


@pytest.mark.parametrize("command", ["compare", "report", "export"])
def test_a_record_that_is_a_folder_is_named_by_its_path(tmp_path, command):
    run = make_run(tmp_path, "run", [make_case("main-1", image_s=[1.0, 1.1, 0.9])])
    (record,) = (run / "results").glob("*.json")
    record.unlink()
    record.mkdir()
    args = {"compare": ["compare", run, run], "report": ["report", run], "export": ["export", run]}[command]
    code, output = invoke(*args)
    said = output + ((run / "report.md").read_text() if command == "report" else "")  # report's warning counts
    assert f"{record} is a folder, not a regular file" in said, said
    assert "Errno" not in said and "Traceback" not in output
    assert code == (2 if command == "compare" else 0)
