"""A case that cannot run because of the machine is not a result about its setup: it runs again on resume, and a
run on a machine that can run none of its remaining cases says so and exits 3."""

from __future__ import annotations

import textwrap

import pytest
import torch
from typer.testing import CliRunner

from flux2bench.cli import app
from flux2bench.errors import MachineLacks, Unsupported
from flux2bench.results import CaseResult
from flux2bench.runner import Runner, SupervisorConfig, RunProgress, start_run
from flux2bench.store import RunStore
from records import case

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")

MIXED = """
defaults: {model: tiny, resolution: 64, steps: 1, repeats: 1, warmup: 0, timeout_s: 120, prompts: "FAULT:none",
           drift_baseline: "off"}
blocks:
  needs-fp8: {device: cpu, precision: fp8}
  needs-gpu: {device: cuda}
  cpu: {device: cpu}
"""


def test_an_unsupported_record_says_whether_the_machine_is_the_reason():
    machine = CaseResult.unsupported(case(), MachineLacks("no CUDA GPU is visible"))
    setup = CaseResult.unsupported(case(), Unsupported("gpus: 2 needs parallel: ulysses or ring"))
    assert CaseResult.from_json(machine.to_json()).machine_lacks
    assert not CaseResult.from_json(setup.to_json()).machine_lacks
    assert "machine_lacks" not in setup.to_json()  # records of other cases keep their bytes


@NO_GPU
def test_a_case_the_machine_cannot_run_runs_again_on_resume(tmp_path, write_scenario, fault_worker):
    """The executor does not place a case for a GPU this host lacks (nothing recorded); a case whose worker finds
    the machine lacking is recorded as such. A resume tries both again."""
    store, cases = start_run(write_scenario(textwrap.dedent(MIXED)), run_dir=tmp_path / "run")
    keys = {c.block: c.key for c in cases}
    progress = RunProgress()
    Runner(store, SupervisorConfig(worker_module=fault_worker), progress=progress).run(cases)
    records = store.records().valid
    assert records[keys["needs-fp8"]].status == "unsupported" and records[keys["needs-fp8"]].machine_lacks
    assert keys["needs-gpu"] not in records and "no NVIDIA GPU" in progress.deferred[keys["needs-gpu"]]
    progress = RunProgress()
    rerun = Runner(store, SupervisorConfig(worker_module=fault_worker), progress=progress).run(cases)
    assert [r.key for r in rerun] == [keys["needs-fp8"]]  # the cpu case is a result; the others were not
    assert progress.skipped == [keys["cpu"]] and list(progress.deferred) == [keys["needs-gpu"]]


@NO_GPU
def test_a_scenario_this_machine_can_run_no_case_of_is_refused_before_anything_is_written(tmp_path, write_scenario):
    scenario = write_scenario("defaults: {model: tiny, device: cuda, resolution: 64, steps: 1, timeout_s: 120}\n"
                              "blocks:\n  main: {}\n")
    result = CliRunner().invoke(app, ["run", str(scenario), "--out", str(tmp_path / "out"), "--no-report"])
    output = " ".join(result.output.split())
    assert result.exit_code == 3, output
    assert "this machine cannot run any case still to run (1 case: device: cuda, and this host has no" in output
    assert not (tmp_path / "out").exists()


@NO_GPU
def test_a_run_whose_workers_find_the_machine_lacking_for_every_case_exits_3_saying_so(tmp_path, write_scenario):
    scenario = write_scenario("defaults: {model: tiny, device: cpu, precision: fp8, resolution: 64, steps: 1, "
                              "timeout_s: 120}\nblocks:\n  main: {}\n")
    result = CliRunner().invoke(app, ["run", str(scenario), "--out", str(tmp_path / "out"), "--no-report"])
    output = " ".join(result.output.split())
    assert result.exit_code == 3, output
    assert "this machine cannot run any of the remaining cases (1 case:" in output
    [run_dir] = (tmp_path / "out").iterdir()
    result = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--no-report"])
    assert result.exit_code == 3 and "cannot run any of the remaining cases (1 case:" in " ".join(result.output.split())
    assert all(r.machine_lacks for r in RunStore(run_dir).results())


def test_a_partial_run_says_it_is_incomplete_in_its_report_and_in_compare(tmp_path):
    from records import result, write_run

    ran, missing, lacking = result(), result(steps=8), CaseResult.unsupported(case(steps=2), MachineLacks("no GPU"))
    run = write_run(tmp_path / "run", [ran, lacking])
    meta = RunStore(run).meta
    RunStore(run).update_meta({**meta, "case_keys": [ran.key, missing.key, lacking.key]})
    (run / "invalid").mkdir()
    (run / "invalid" / "main-0.json").write_text("{")
    problems = RunStore(run).incomplete()
    assert problems == [f"1 case(s) without a result: {missing.key}",
                        "1 record(s) set aside as invalid: invalid/main-0.json",
                        f"1 case(s) the machine could not run (not a result about the setup): {lacking.key}"]
    assert CliRunner().invoke(app, ["report", str(run)]).exit_code == 0
    assert f"**Incomplete run**: {'; '.join(problems)}" in (run / "report.md").read_text()
    output = " ".join(CliRunner().invoke(app, ["compare", str(run), str(run)]).output.split())
    assert f"the current run {run} is incomplete: {'; '.join(problems)}" in output


@pytest.mark.parametrize("precision", ["nf4", "fp8", "fp8_row"])
def test_a_quantization_backend_that_needs_a_gpu_says_the_machine_lacks_it(precision):
    from flux2bench.axes.precision import check_precision_supported

    with pytest.raises(MachineLacks, match="GPU"):
        check_precision_supported(precision, torch.device("cpu"))
