"""The isolated runner: how a worker's end becomes a status, durable records, resume, and the real tiny pipeline.

Faults are injected by tests/fault_worker.py (the real worker with a fake pipeline for ``FAULT:`` prompts), so the
worker's own exception handling and the runner's classification of exit codes are what is under test.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from fault_worker import BALLAST_BYTES, CRASH_MARKER, HANG_CHILD_PID_FILE
from PIL import Image
from safetensors.torch import load_file

from conftest import FinishedRun

from flux2bench.axes.text_encoder import embedding_cache_path
from flux2bench.results import CaseResult
from flux2bench.executors.local import LocalExecutor
from flux2bench.runner import Runner, RunProgress, SupervisorConfig, start_run
from flux2bench.supervision.process import WorkerExit, classify
from flux2bench.trackers.memory import GIB, RSS_METHOD

BALLAST_GIB = BALLAST_BYTES / GIB
HANG_TIMEOUT_S = 20

FAULTS = f"""
defaults:
  model: tiny
  device: cpu
  resolution: 64
  steps: 2
  repeats: 1
  warmup: 0
  timeout_s: 120
blocks:
  oom: {{prompts: "FAULT:oom"}}
  cublas-oom: {{prompts: "FAULT:cublas"}}
  error: {{prompts: "FAULT:error"}}
  crash: {{prompts: "FAULT:crash"}}
  hang: {{prompts: "FAULT:hang", timeout_s: {HANG_TIMEOUT_S}}}
  host-oom: {{prompts: "FAULT:sigkill"}}
  offload-on-cpu: {{prompts: "FAULT:none", offload: model}}
  after-the-faults: {{prompts: "FAULT:none"}}
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- outcomes -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faults(run_scenario, fault_worker):
    return run_scenario(FAULTS, "faults", worker_module=fault_worker)


def test_every_case_gets_one_record_and_the_run_goes_on_after_each_fault(faults):
    assert [r.key for r in faults.results] == [c.key for c in faults.cases]
    assert [r.status for r in faults.results] == ["oom", "oom", "error", "error", "timeout", "killed",
                                                  "unsupported", "ok"]
    assert sorted(p.stem for p in faults.store.results_dir.iterdir()) == sorted(c.key for c in faults.cases)


@pytest.mark.parametrize("block, reason", [("oom", "OutOfMemoryError: CUDA out of memory"),
                                           ("cublas-oom", "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED")])
def test_an_out_of_memory_error_in_the_measured_phase_is_oom(faults, block, reason):
    result = faults[block]
    assert result.status == "oom"
    assert result.reason.startswith(reason)
    assert "Traceback" in result.error


def test_an_oom_keeps_the_memory_peaks_it_reached(faults):
    memory = faults["oom"].memory
    assert set(memory) == {"load", "inference"}
    peak = memory["inference"].host_rss_peak_gib
    assert peak.method == RSS_METHOD
    assert peak.value - memory["load"].host_rss_peak_gib.value >= 0.9 * BALLAST_GIB
    assert faults["oom"].latency is not None and faults["oom"].latency.load_s > 0


def test_an_exception_in_the_worker_is_error_with_its_traceback(faults):
    result = faults["error"]
    assert result.status == "error"
    assert result.reason == "RuntimeError: injected failure in the denoising loop"
    assert "Traceback" in result.error and "fault_worker.py" in result.error
    assert "inference" in result.memory


def test_a_crashed_worker_is_error_with_its_exit_code_last_stage_and_log_tail(faults):
    result = faults["crash"]
    assert result.status == "error"
    assert result.reason == f"worker exited with code {-signal.SIGABRT} without a result; last stage: repeat 1/1"
    assert CRASH_MARKER in result.error
    assert (faults.store.root / result.log).read_text().count(CRASH_MARKER) == 1


def test_a_hung_worker_is_timeout_and_its_whole_process_group_is_killed(faults):
    result = faults["hang"]
    assert result.status == "timeout"
    assert result.reason == f"exceeded timeout_s={HANG_TIMEOUT_S}; last stage: repeat 1/1"
    child = int((faults.store.root / HANG_CHILD_PID_FILE).read_text())
    assert gone(child), "the worker's child process survived the timeout"


def test_a_worker_sigkilled_without_oom_killer_evidence_is_killed_with_peaks_read_from_its_timeline(faults):
    result = faults["host-oom"]
    assert result.status == "killed"
    assert "killed by SIGKILL from outside" in result.reason and result.reason.endswith("last stage: repeat 1/1")
    assert result.timeline == f"timelines/{result.key}.csv.gz"
    assert not (faults.store.root / "timelines" / f"{result.key}.csv").exists()
    inference, load = result.memory["inference"], result.memory["load"]
    assert "timeline" in inference.host_rss_peak_gib.method
    assert inference.host_rss_peak_gib.value - load.host_rss_peak_gib.value >= 0.9 * BALLAST_GIB
    assert inference.gpu_allocated_peak_gib.value is None
    assert inference.gpu_allocated_peak_gib.reason == "the worker was killed before it reported"


@pytest.mark.parametrize("oom_kills, status", [(1, "host_oom"), (0, "killed"), (None, "killed")])
def test_a_sigkill_is_host_oom_only_with_the_cgroups_evidence(tmp_path, tiny_case, oom_kills, status):
    log = tmp_path / "logs" / "case.log"
    log.parent.mkdir()
    log.write_text("")
    ended = WorkerExit(-signal.SIGKILL, False, None, log, "repeat 1/1", oom_kills, "2026-01-01T00:00:00", 1.0)
    result = classify(tiny_case(), ended, tmp_path)
    assert result.status == status
    assert ("oom_kill counter rose by 1" in result.reason) == (status == "host_oom")


def test_an_unsupported_case_records_why(faults):
    result = faults["offload-on-cpu"]
    assert result.status == "unsupported"
    assert result.reason == "offload: model moves weights between host and an accelerator; no CUDA GPU here"
    assert result.latency is None and result.memory == {}


def test_results_are_one_durable_json_file_per_case(faults):
    for result in faults.results:
        text = (faults.store.results_dir / f"{result.key}.json").read_text()
        assert text == result.to_json()
        assert CaseResult.from_json(text).to_json() == text
    assert [p.name for p in faults.store.results_dir.iterdir() if not p.name.endswith(".json")] == []
    assert [r.key for r in faults.store.results()] == [c.key for c in faults.cases]


# --- resume after kill -9 (slow: two `flux2bench run` commands, each in a fresh interpreter) -----------------

RESUMABLE = """
defaults:
  model: tiny
  device: cpu
  resolution: 64
  steps: 1
  repeats: 1
  warmup: 0
  timeout_s: 300
blocks:
  quick: {parallel: ulysses}  # unsupported by its setup (one GPU), a result on any machine
  slow: {}
"""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flux2bench", "run", *args, "--no-report"]


def kill_after_first_result(command: list[str], out: Path, log: Path, timeout_s: float = 120) -> Path:
    """Start the CLI, and kill -9 it (and its worker, which runs in a session of its own) once one record exists."""
    with open(log, "w") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    try:
        while not list(out.glob("*/results/*.json")):
            assert proc.poll() is None, f"the run ended before it was killed:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no result file appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)  # frozen, it can start no further worker while we list them
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    for worker in workers:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    psutil.wait_procs(workers, timeout=10)
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    scenario = root / "resumable.yaml"
    scenario.write_text(textwrap.dedent(RESUMABLE))
    run_dir = kill_after_first_result(cli(str(scenario), "--out", str(root / "out")), root / "out", root / "cli.log")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run_dir / "results").iterdir()}
    time.sleep(0.01)  # so that a rewrite would show in the mtime
    finished = subprocess.run(cli("--resume", str(run_dir)), capture_output=True, text=True, timeout=300,
                              check=False)
    return run_dir, before, finished


@pytest.mark.slow
def test_the_kill_came_between_the_first_and_the_second_record(resumed):
    run_dir, before, _ = resumed
    keys = json.loads((run_dir / "run.json").read_text())["case_keys"]
    assert list(before) == [f"{keys[0]}.json"]


@pytest.mark.slow
def test_resume_finishes_the_run_with_exactly_one_valid_record_per_case(resumed):
    run_dir, _, finished = resumed
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "skipped 1 finished case" in finished.stdout
    keys = json.loads((run_dir / "run.json").read_text())["case_keys"]
    assert sorted(os.listdir(run_dir / "results")) == sorted(f"{key}.json" for key in keys)  # no .tmp left
    records = [CaseResult.from_json((run_dir / "results" / f"{key}.json").read_text()) for key in keys]
    assert [r.status for r in records] == ["unsupported", "ok"]


@pytest.mark.slow
def test_resume_does_not_rerun_a_finished_case(resumed):
    run_dir, before, _ = resumed
    for name, (mtime, content) in before.items():
        path = run_dir / "results" / name
        assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime, content)


@pytest.mark.slow
def test_resume_is_recorded_in_run_json(resumed):
    run_dir, _, _ = resumed
    meta = json.loads((run_dir / "run.json").read_text())
    assert len(meta["resumed"]) == 1 and set(meta["resumed"][0]) == {"at", "environment"}


# --- the real tiny pipeline end to end: the session's shared run (conftest's TINY_RUN) ----------------------

@pytest.fixture(scope="module")
def e2e(tiny_run):
    result = tiny_run["e2e"]
    assert result.status == "ok", f"{result.reason}\n{result.error}"
    return result


def test_latency_has_one_image_sample_per_repeat_and_every_step(e2e):
    latency = e2e.latency
    assert len(latency.stages["image"]) == 2
    assert len(latency.warmup_s) == 1
    assert [len(steps) for steps in latency.steps] == [2, 2]
    assert all(s > 0 for steps in latency.steps for s in steps)
    assert latency.load_s > 0
    assert all(denoise < image for denoise, image in zip(latency.stages["denoise"], latency.stages["image"]))


def test_host_memory_is_measured_with_its_method(e2e):
    for phase in ("load", "inference"):
        peak = e2e.memory[phase].host_rss_peak_gib
        assert peak.value > 0 and peak.method == RSS_METHOD


def test_gpu_metrics_are_none_with_a_reason_without_cuda(e2e):
    memory = e2e.memory["inference"]
    for metric in (memory.gpu_allocated_peak_gib, memory.gpu_reserved_peak_gib, memory.gpu_device_peak_gib,
                   memory.host_pinned_peak_gib):
        assert metric.value is None and metric.reason


def test_the_image_and_its_latents_are_saved(tiny_run, e2e):
    (output,) = e2e.outputs
    assert (output.prompt, output.seed) == (0, 0)
    with Image.open(tiny_run.store.root / output.image) as image:
        assert image.format == "PNG" and image.size == (128, 128)
    latents = load_file(str(tiny_run.store.root / output.latents))["latents"]
    assert latents.numel() > 0 and latents.isfinite().all()


def test_the_timeline_is_gzipped_csv_with_rows_of_both_phases(tiny_run, e2e):
    assert e2e.timeline == f"timelines/{e2e.key}.csv.gz"
    with gzip.open(tiny_run.store.root / e2e.timeline, "rt", newline="") as f:
        phases = {row["phase"] for row in csv.DictReader(f)}
    assert {"load", "inference"} <= phases


def test_the_setup_that_was_applied_is_recorded(e2e):
    assert e2e.setup.device == "cpu"
    assert e2e.setup.axes["offload"]["method"] == "pipe.to"
    assert e2e.setup.axes["attention"]["backend"] == "native"


def test_an_unknown_attention_backend_is_unsupported_with_the_names_there_are_not_a_lack_of_the_machine(tiny_run):
    result = tiny_run["unknown-attention"]
    assert result.status == "unsupported" and not result.machine_lacks
    assert result.reason.startswith("attention 'no_such_backend' is not an attention backend: use sdpa, fa3, fa4 or "
                                    "one of diffusers' ")
    assert "native" in result.reason and result.outputs == []


def test_the_real_result_file_parses_back(tiny_run):
    for result in tiny_run.results:
        text = (tiny_run.store.results_dir / f"{result.key}.json").read_text()
        assert CaseResult.from_json(text) == result


# --- precomputed prompt embeddings -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def precomputed(run_scenario, fault_worker):
    # The fault worker without a FAULT: prompt is the real worker, plus a log of what each load_pipeline loaded.
    return run_scenario("""
        blocks:
          precomputed:
            model: tiny
            device: cpu
            resolution: 64
            steps: 1
            repeats: 1
            warmup: 0
            text_encoder: precomputed
            timeout_s: 300
    """, "precomputed", worker_module=fault_worker)


def loads(run, name: str) -> list[dict]:
    return json.loads((run.store.root / "loads" / f"{name}.json").read_text())


def test_precomputed_runs_a_separate_embedding_step_that_loads_only_the_text_encoder(precomputed):
    case = precomputed.case("precomputed")
    assert embedding_cache_path(precomputed.store.root, case).is_file()
    assert (precomputed.store.root / "logs" / f"{case.key}-text_encoder.log").is_file()
    (embed,) = loads(precomputed, f"{case.key}-text_encoder")
    assert embed["components"]["text_encoder"] == "Mistral3ForConditionalGeneration"
    assert embed["components"]["transformer"] is None and embed["components"]["vae"] is None


def test_the_measured_precomputed_case_does_not_load_a_text_encoder(precomputed):
    result = precomputed["precomputed"]
    assert result.status == "ok", f"{result.reason}\n{result.error}"
    (measured,) = loads(precomputed, result.key)
    assert measured["skip"] == ["text_encoder"]
    assert measured["components"]["text_encoder"] is None
    assert measured["components"]["transformer"] == "Flux2Transformer2DModel"


# --- several device slots ------------------------------------------------------------------------------------

SLOTS = ["7", "8"]


TWO_SLOTS = """
    blocks:
      spread:
        model: tiny
        device: cpu
        resolution: [64, 80, 96, 112]
        steps: 1
        repeats: 1
        warmup: 0
        prompts: "FAULT:none"
        text_encoder: precomputed
        timeout_s: 120
"""


@dataclass
class SlotRun:
    run: FinishedRun
    most_at_once: int  # the most cases between on_case_start and on_case_end at one time


@pytest.fixture(scope="module")
def two_slots(tmp_path_factory, fault_worker):
    root = tmp_path_factory.mktemp("two-slots")
    (root / "two-slots.yaml").write_text(textwrap.dedent(TWO_SLOTS))
    store, cases = start_run(root / "two-slots.yaml", run_dir=root / "run")
    running, most = set(), [0]

    def started(case, device):
        running.add(case.key)
        most[0] = max(most[0], len(running))

    hooks = RunProgress(on_case_start=started, on_case_end=lambda result: running.discard(result.key))
    results = Runner(store, SupervisorConfig(worker_module=fault_worker), progress=hooks,
                     executor=LocalExecutor(SLOTS)).run(cases)
    return SlotRun(FinishedRun(store, cases, results), most[0])


def test_each_slot_runs_its_workers_on_its_own_device_with_a_share_of_the_cpus(two_slots):
    run = two_slots.run
    assert [r.status for r in run.results] == ["ok"] * 4
    for result in run.results:
        (measured,) = loads(run, result.key)
        assert measured["cuda_visible_devices"] == result.setup.runner.cuda_visible_devices
        assert result.setup.runner.concurrent_slots == len(SLOTS)
        assert measured["omp_num_threads"] == result.setup.runner.omp_num_threads == os.environ.get(
            "OMP_NUM_THREADS", str(max(1, os.cpu_count() // len(SLOTS))))
    assert {r.setup.runner.cuda_visible_devices for r in run.results} == set(SLOTS)


def test_two_slots_run_two_cases_at_a_time(two_slots):
    assert two_slots.most_at_once == len(SLOTS)


def test_cases_sharing_prompts_compute_their_embeddings_once_across_slots(two_slots):
    run = two_slots.run
    embeds = list((run.store.root / "loads").glob("*-text_encoder.json"))
    assert len(embeds) == 1 and len(json.loads(embeds[0].read_text())) == 1
    assert len(list((run.store.root / "embeddings").glob("*.safetensors"))) == 1
