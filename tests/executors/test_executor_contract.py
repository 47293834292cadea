"""What every executor does, whoever places the cases: the local one, Ray's, and a third written in the tests
(tests/thread_executor.py: one module and one registration). Each case gets one record, with the files its worker
wrote, saying where it ran; a case the executor cannot place is deferred, never recorded; a rerun runs nothing
finished."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flux2bench import executors
from flux2bench.executors import ExecutorOptions, make_executor
from flux2bench.results import Status
from flux2bench.runner import Runner, RunProgress, SupervisorConfig, start_run

# device auto: a case that names a GPU kind cannot also name the CPU
FAULT = {"model": "tiny", "device": "auto", "resolution": 64, "steps": 1, "repeats": 1, "warmup": 0, "timeout_s": 120,
         "drift_baseline": "off"}
EXECUTORS = ["local", "threads", pytest.param("ray", marks=pytest.mark.slow)]


@pytest.fixture
def thread_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one registration a new executor needs."""
    monkeypatch.setitem(executors.EXECUTORS, "threads", "thread_executor:ThreadExecutor")


def _run(tmp_path: Path, name: str, fault_worker: str, blocks: dict) -> tuple[Runner, list]:
    if name == "ray":
        pytest.importorskip("ray")
    scenario = tmp_path / "contract.yaml"
    scenario.write_text(json.dumps({"name": "contract", "defaults": FAULT, "blocks": blocks}))
    store, cases = start_run(scenario, run_dir=tmp_path / "run")
    options = ExecutorOptions(name=name)
    runner = Runner(store, SupervisorConfig(worker_module=fault_worker), executor=make_executor(options),
                    progress=RunProgress())
    runner.run(cases)
    return runner, cases


@pytest.mark.parametrize("name", EXECUTORS)
def test_every_case_gets_one_record_with_its_files_saying_where_it_ran(tmp_path, fault_worker, thread_executor, name):
    blocks = {"fine": {"prompts": "FAULT:none", "seeds": [1, 2]}, "broken": {"prompts": "FAULT:error"}}
    runner, cases = _run(tmp_path, name, fault_worker, blocks)
    records = runner.store.records().valid
    assert sorted(records) == sorted(c.key for c in cases)
    assert {c.block: records[c.key].status for c in cases} == {"fine": Status.OK, "broken": Status.ERROR}
    for record in records.values():
        assert record.setup.runner.executor == name and record.setup.runner.host
        assert (runner.store.root / record.log).is_file()
        assert all((runner.store.root / output.image).is_file() for output in record.outputs)
    assert runner.run(cases) == [] and sorted(runner.progress.skipped) == sorted(c.key for c in cases)


@pytest.mark.parametrize("name", EXECUTORS)
def test_a_case_the_executor_cannot_place_is_deferred_and_not_recorded(tmp_path, fault_worker, thread_executor, name):
    runner, cases = _run(tmp_path, name, fault_worker, {"elsewhere": {"prompts": "FAULT:none", "gpu": "B200"}})
    (case,) = cases
    assert "B200" in runner.progress.deferred[case.key]
    assert runner.store.records().valid == {}


def test_an_executor_refuses_the_options_of_another(thread_executor):
    with pytest.raises(executors.ExecutorUnavailable, match="--devices is for the local executor"):
        make_executor(ExecutorOptions(name="threads", devices="0"))
