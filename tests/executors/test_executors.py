"""Executors place cases: the local one over this host's GPUs, by GPU kind when a case names one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flux2bench.axes.gpu import kind_of
from flux2bench.drift_baseline import pick_drift_baseline
from flux2bench.cli import app
from flux2bench.executors import ExecutorOptions, ExecutorUnavailable, make_executor
from flux2bench.executors.local import LocalExecutor
from flux2bench.results import Status
from flux2bench.runner import Runner, SupervisorConfig, resume_run, start_run
from flux2bench.scenario import load_cases
from records import case as record_case
from records import result as record_result

# device auto: a case that names a GPU kind cannot also name the CPU (the fake executors place it on this host)
FAULT = {"model": "tiny", "device": "auto", "resolution": 64, "steps": 1, "repeats": 1, "warmup": 0, "timeout_s": 120,
         "prompts": "FAULT:none"}


def _scenario(tmp_path: Path, blocks: dict) -> Path:
    path = tmp_path / "kinds.yaml"
    path.write_text(json.dumps({"name": "kinds", "defaults": FAULT, "blocks": blocks}))
    return path


@pytest.mark.parametrize("name, kind", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA B200", "B200"), ("NVIDIA GeForce RTX 4090", "GeForce-RTX-4090"),
    ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "RTX-PRO-6000"), (None, None),
])
def test_a_gpu_kind_is_named_as_ray_names_accelerator_types(name, kind):
    assert kind_of(name) == kind


def test_the_gpu_axis_enters_the_key_only_when_set(tmp_path):
    plain, on_h100 = (load_cases(_scenario(tmp_path, {"a": extra}))[0] for extra in ({}, {"gpu": "H100"}))
    assert plain.key == load_cases(_scenario(tmp_path, {"a": {"gpu": None}}))[0].key
    assert plain.key != on_h100.key and on_h100.label.endswith("on=H100")


def test_a_drift_baseline_is_taken_from_the_same_gpu_kind_only():
    fp8 = record_case(precision="fp8", gpu="H100")
    baselines = [record_result(gpu=kind, block="base") for kind in ("H200", "H100")]
    assert pick_drift_baseline(fp8, baselines).case.settings["gpu"] == "H100"
    assert pick_drift_baseline(fp8, baselines[:1]) is None


def test_the_local_executor_runs_only_the_cases_of_this_hosts_gpu_kind_and_a_resume_elsewhere_runs_the_rest(
        tmp_path, fault_worker):
    store, cases = start_run(_scenario(tmp_path, {"kinds": {"gpu": ["H100", "H200"]}}), run_dir=tmp_path / "run")
    runner = Runner(store, SupervisorConfig(worker_module=fault_worker), executor=LocalExecutor(gpu_names=lambda: ["NVIDIA H200"]))
    (ran,) = runner.run(cases)
    assert ran.case.settings["gpu"] == "H200" and ran.status == Status.OK
    assert ran.setup.runner.executor == "local" and ran.setup.runner.host
    ((deferred, reason),) = runner.progress.deferred.items()
    assert "needs a H100 GPU; this host has H200" in reason
    assert deferred not in store.completed_keys()  # a fact about this machine, not a result: nothing recorded

    store, cases = resume_run(store.root)
    Runner(store, SupervisorConfig(worker_module=fault_worker),
           executor=LocalExecutor(gpu_names=lambda: ["NVIDIA H100 80GB HBM3"])).run(cases)
    assert {r.case.settings["gpu"]: r.status for r in store.results()} == {"H100": Status.OK, "H200": Status.OK}


def test_a_run_no_case_of_which_this_machine_can_run_exits_3_and_writes_nothing(tmp_path):
    scenario = _scenario(tmp_path, {"b200": {"gpu": "B200"}})
    result = CliRunner().invoke(app, ["run", str(scenario), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 3, result.output
    assert "needs a B200 GPU" in result.output and "cannot run any case still to run" in result.output
    assert not (tmp_path / "runs").exists()


def test_executor_options_that_do_not_fit_together_are_refused():
    with pytest.raises(ExecutorUnavailable, match="--address is for the ray executor"):
        make_executor(ExecutorOptions(name="local", address="auto"))
    with pytest.raises(ExecutorUnavailable, match="--devices is for the local executor"):
        make_executor(ExecutorOptions(name="ray", devices="0"))
    with pytest.raises(ExecutorUnavailable, match="unknown executor 'slurm'"):
        make_executor(ExecutorOptions(name="slurm"))
