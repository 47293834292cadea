"""The run directory cannot be corrupted: one runner at a time, invalid records set aside and rerun, every file a
record names resolved inside the directory, no orphan worker, nothing left in tmp/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from flux2bench.results import CaseResult
from flux2bench.runner import Runner, SupervisorConfig, RunProgress, start_run
from flux2bench.store import RunDirError, RunStore, inside
from flux2bench.child_env import PARENT_PID as PARENT_PID_ENV

from records import result

QUICK = """
defaults: {model: tiny, device: cpu, resolution: 64, steps: 1, repeats: 1, warmup: 0, timeout_s: 120,
           prompts: "FAULT:none", drift_baseline: "off"}
blocks:
  first: {}
  second: {steps: 2}
"""


@pytest.fixture
def quick_run(tmp_path, fault_worker):
    """A run directory of two cheap cases (the fault worker's fake pipeline) and a way to run it again."""
    scenario = tmp_path / "quick.yaml"
    scenario.write_text(textwrap.dedent(QUICK))
    store, cases = start_run(scenario, run_dir=tmp_path / "run")

    def run(**options):
        progress = RunProgress()
        set_aside = []
        progress.on_set_aside = lambda path, reason: set_aside.append((path, reason))
        results = Runner(store, SupervisorConfig(worker_module=fault_worker), progress=progress, **options).run(cases)
        return results, set_aside

    return store, cases, run


def test_a_second_runner_is_refused_naming_the_holders_pid(quick_run):
    store, cases, run = quick_run
    with store.locked():
        with pytest.raises(RunDirError, match=f"in use by another flux2bench run \\(pid {os.getpid()}\\)"):
            run()
    assert store.completed_keys() == set()  # the refused runner ran nothing


@pytest.mark.parametrize("damage", ["", "{\"key\": ", "not json at all", "[]", "{\"key\": \"x\"}"])
def test_an_invalid_record_is_set_aside_reported_and_its_case_rerun(quick_run, damage):
    store, cases, run = quick_run
    run()
    damaged = store.results_dir / f"{cases[0].key}.json"
    damaged.write_text(damage)
    assert store.completed_keys() == {cases[1].key}
    assert [r.key for r in store.results()] == [cases[1].key]  # report and export read the valid ones
    results, set_aside = run()
    assert [r.key for r in results] == [cases[0].key]
    ((path, reason),) = set_aside
    assert path == store.root / "invalid" / damaged.name and path.read_text() == damage and reason
    assert CaseResult.from_json(damaged.read_text()).status == "ok"


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.png", "images/../../outside.png"])
def test_a_record_naming_a_file_outside_its_run_directory_is_invalid(name):
    record = result()
    record.timeline = name
    with pytest.raises(ValueError, match="outside its run directory"):
        CaseResult.from_json(record.to_json())


def test_a_link_out_of_the_run_directory_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (tmp_path / "run" / "image.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(ValueError, match="outside the run directory"):
        inside(tmp_path / "run", "image.png")
    assert inside(tmp_path / "run", "images/a.png") == (tmp_path / "run" / "images" / "a.png").resolve()


def test_a_damaged_run_json_is_a_clear_error(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match="run.json: unreadable run description"):
        RunStore.open(tmp_path)


def test_a_run_leaves_nothing_in_tmp_and_cleans_what_an_interrupted_run_left(quick_run):
    store, _, run = quick_run
    leftover = store.subdir("tmp") / "first-abc-123.case.json"
    leftover.write_text("{}")
    run()
    assert not (store.root / "tmp").exists() or list((store.root / "tmp").iterdir()) == []


def test_retry_failed_reruns_only_the_failed_cases(quick_run):
    store, cases, run = quick_run
    run()
    failed = CaseResult.from_json((store.results_dir / f"{cases[0].key}.json").read_text())
    failed.status, failed.reason = "killed", "killed by SIGKILL from outside"
    store.write(failed)
    assert run()[0] == []  # a plain resume keeps the failed record
    (rerun,) = run(retry_failed=True)[0]
    assert rerun.key == cases[0].key and rerun.status == "ok"


def test_a_worker_whose_runner_is_gone_exits_at_once_without_writing(tmp_path, tiny_case):
    case_path = tmp_path / "case.json"
    case_path.write_text(json.dumps(tiny_case().to_dict()))
    env = {**os.environ, PARENT_PID_ENV: "1"}  # not this worker's parent: the runner died before it started
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flux2bench.worker", str(case_path), str(tmp_path / "r.json"),
                           str(tmp_path)], env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 3 and time.monotonic() - started < 10
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "timelines").exists()


def workers_of(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "flux2bench.worker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # gone, or a zombie, meanwhile
            pass
    return found


@pytest.mark.slow
def test_killing_the_runner_in_its_first_second_leaves_no_worker(tmp_path):
    scenario = tmp_path / "one.yaml"
    scenario.write_text("blocks:\n  one: {model: tiny, device: cpu, resolution: 64, steps: 1, repeats: 1, warmup: 0}\n")
    runner = subprocess.Popen([sys.executable, "-m", "flux2bench", "run", str(scenario), "--out",
                               str(tmp_path / "out"), "--no-report"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    workers: list[psutil.Process] = []
    while not workers and time.monotonic() < deadline and runner.poll() is None:
        workers = workers_of(runner.pid)
        time.sleep(0.01)
    runner.kill()  # while the worker is still importing torch and diffusers
    runner.wait()
    assert workers, "no worker was started"
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert alive == [], "a worker outlived its runner"
