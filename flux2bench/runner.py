"""The isolated runner: one fresh worker process per case, outcomes classified, results stored durably.

Each case runs in ``python -m flux2bench.worker`` started in its own session, so offload hooks,
compile caches, attention settings and leaked memory never carry over, and a crash, a hang or the
kernel's OOM killer ends one case only. The parent never touches CUDA.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from flux2bench import __version__
from flux2bench.drift import (METRIC_NAMES, apply_thresholds, baseline_case, compare_outputs, drift_label, needs_drift,
                              pick_baseline)
from flux2bench.results import CaseResult, Drift, Metric, RunStore
from flux2bench.scenario import Case, DriftThresholds, load_cases
from flux2bench.trackers.environment import capture_environment
from flux2bench.trackers.memory import peaks_from_timeline
from flux2bench.worker import EVENTS_FD_ENV, embedding_cache_path

WORKER_MODULE = "flux2bench.worker"
_CGROUP_EVENTS = Path("/sys/fs/cgroup/memory.events")
_LOG_TAIL_LINES = 40


@dataclass
class WorkerExit:
    returncode: int
    timed_out: bool
    result: CaseResult | None
    log: Path
    last_stage: str | None
    oom_kills: int | None  # increase of the cgroup's oom_kill counter while the worker ran, if readable
    started_at: str
    wall_s: float


@dataclass
class RunProgress:
    """Callbacks the CLI's progress display hooks into; all optional."""

    on_case_start: Callable[[int, int, Case], None] = lambda i, n, case: None
    on_stage: Callable[[str], None] = lambda stage: None
    on_case_end: Callable[[CaseResult], None] = lambda result: None
    skipped: list[str] = field(default_factory=list)


def _oom_kill_count() -> int | None:
    try:
        for line in _CGROUP_EVENTS.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except OSError:
        pass
    return None


def _log_tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:])
    except OSError:
        return ""


class Runner:
    def __init__(self, store: RunStore, worker_module: str = WORKER_MODULE, progress: RunProgress | None = None):
        self.store = store
        self.worker_module = worker_module
        self.progress = progress or RunProgress()

    def run(self, cases: list[Case]) -> list[CaseResult]:
        done = self.store.completed_keys()
        pending = [c for c in cases if c.key not in done]
        self.progress.skipped.extend(c.key for c in cases if c.key in done)
        results = []
        for i, case in enumerate(pending):
            self.progress.on_case_start(i, len(pending), case)
            result = self.attach_drift(case, self.run_case(case))
            self.store.write(result)
            self.progress.on_case_end(result)
            results.append(result)
        return results

    def run_case(self, case: Case) -> CaseResult:
        if case.text_encoder == "precomputed" and not embedding_cache_path(self.store.root, case).exists():
            embedding = self._spawn(case, embed=True)
            if embedding.returncode != 0 or embedding.timed_out:
                failed = self._classify(case, embedding)
                failed.reason = f"prompt-embedding step failed: {failed.reason}"
                return failed
        return self._classify(case, self._spawn(case))

    def attach_drift(self, case: Case, result: CaseResult) -> CaseResult:
        """Compare an ok case that changes numerics with its bf16 baseline, running the baseline if needed."""
        if case.drift_baseline == "off" or result.status != "ok" or not needs_drift(result.case):
            return result
        baseline = pick_baseline(result.case, self.store.results())
        if baseline is None and case.drift_baseline == "run":
            baseline = self._run_baseline(case)
        if baseline is None:
            reason = ("no ok bf16 baseline with the same model, prompts, seeds, geometry and steps "
                      f"(drift_baseline: {case.drift_baseline})")
            result.drift = Drift(None, drift_label(case.weights),
                                 {name: Metric.missing("against the bf16 baseline", reason) for name in METRIC_NAMES})
            return result
        result.drift = compare_outputs(self.store.root, result, baseline)
        result.drift.failed = apply_thresholds(result.drift, DriftThresholds(**dict(case.drift_thresholds)))
        if result.drift.failed:
            result.status, result.reason = "drift_fail", "drift thresholds broken: " + ", ".join(result.drift.failed)
        return result

    def _run_baseline(self, case: Case) -> CaseResult | None:
        """Run (once per run directory) the case's baseline: no offload, else model offload if that did not fit."""
        for offload in ("none", "model"):
            data = {**baseline_case(case.to_dict()), "offload": offload, "block": f"{case.block}.baseline", "key": ""}
            baseline = Case.from_dict(data)
            done = {r.key: r for r in self.store.results()}
            result = done.get(baseline.key)
            if result is None:
                self.progress.on_stage(f"running the bf16 baseline (offload {offload})")
                result = self.run_case(baseline)
                self.store.write(result)
            if result.status == "ok":
                return result
            if result.status not in ("oom", "unsupported"):
                return None
        return None

    def _spawn(self, case: Case, embed: bool = False) -> WorkerExit:
        tmp = self.store.subdir("tmp")
        logs = self.store.subdir("logs")
        suffix = "-embed" if embed else ""
        attempt = f"{case.key}{suffix}-{os.getpid()}-{time.monotonic_ns()}"
        case_path, result_path = tmp / f"{attempt}.case.json", tmp / f"{attempt}.result.json"
        log_path = logs / f"{case.key}{suffix}.log"
        case_path.write_text(json.dumps(case.to_dict()))
        result_path.unlink(missing_ok=True)
        command = [sys.executable, "-m", self.worker_module, str(case_path), str(result_path), str(self.store.root)]
        if embed:
            command.append("--embed")
        read_fd, write_fd = os.pipe()
        oom_before = _oom_kill_count()
        started_at, start = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    pass_fds=(write_fd,), env={**os.environ, EVENTS_FD_ENV: str(write_fd),
                                                               "PYTHONUNBUFFERED": "1"},
                                    start_new_session=True)
        os.close(write_fd)
        stages: list[str] = []
        reader = threading.Thread(target=self._read_events, args=(read_fd, stages), daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=case.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except BaseException:  # Ctrl-C or a kill of the runner: take the worker down with it
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        reader.join(timeout=5)
        oom_after = _oom_kill_count()
        result = None
        if not embed and result_path.exists():
            try:
                result = CaseResult.from_json(result_path.read_text())
                result.log = str(log_path.relative_to(self.store.root))
            except ValueError:  # unreadable: classified like a worker that wrote nothing
                result = None
        case_path.unlink(missing_ok=True)
        result_path.unlink(missing_ok=True)
        return WorkerExit(proc.returncode, timed_out, result, log_path, stages[-1] if stages else None,
                          None if oom_before is None or oom_after is None else oom_after - oom_before,
                          started_at, time.perf_counter() - start)

    def _read_events(self, fd: int, stages: list[str]) -> None:
        with os.fdopen(fd) as stream:
            for line in stream:
                try:
                    stage = json.loads(line)["stage"]
                except (ValueError, KeyError):
                    continue
                stages.append(stage)
                self.progress.on_stage(stage)

    def _classify(self, case: Case, exit_: WorkerExit) -> CaseResult:
        if exit_.result is not None:
            if exit_.timed_out:  # the measurement finished; only the process's exit hung
                exit_.result.setup["worker_exit"] = f"killed after timeout_s={case.timeout_s:g} while exiting"
            return exit_.result
        result = CaseResult(key=case.key, block=case.block, label=case.label, case=case.to_dict(), status="error",
                            weights=case.weights, log=str(exit_.log.relative_to(self.store.root)),
                            started_at=exit_.started_at, wall_s=exit_.wall_s)
        timeline = self.store.root / "timelines" / f"{case.key}.csv"
        if timeline.exists():
            result.timeline = str(timeline.relative_to(self.store.root))
            result.memory = peaks_from_timeline(timeline, reason="the worker was killed before it reported")
        where = f"; last stage: {exit_.last_stage}" if exit_.last_stage else ""
        if exit_.timed_out:
            result.status, result.reason = "timeout", f"exceeded timeout_s={case.timeout_s:g}{where}"
        elif exit_.returncode == -signal.SIGKILL:
            evidence = ("the cgroup's oom_kill counter rose by " f"{exit_.oom_kills}" if exit_.oom_kills
                        else "not confirmed by the cgroup's memory.events")
            result.status = "host_oom"
            result.reason = f"worker killed by SIGKILL, the kernel OOM killer's signal ({evidence}){where}"
        else:
            result.reason = f"worker exited with code {exit_.returncode} without a result{where}"
            result.error = _log_tail(exit_.log)
        return result


def new_run_dir(scenario_path: Path, out_root: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, n = out_root / f"{scenario_path.stem}-{stamp}", 1
    while path.exists():
        n += 1
        path = out_root / f"{scenario_path.stem}-{stamp}-{n}"
    return path


def start_run(scenario_path: str | Path, run_dir: Path | None = None, out_root: str | Path = "reports",
              blocks: list[str] | None = None) -> tuple[RunStore, list[Case]]:
    """Validate the scenario, then create the run directory with run.json (nothing is created for a bad file)."""
    scenario_path = Path(scenario_path)
    cases = load_cases(scenario_path, blocks)
    run_dir = run_dir or new_run_dir(scenario_path, Path(out_root))
    meta = {
        "run_id": run_dir.name,
        "scenario_path": str(scenario_path),
        "scenario_text": scenario_path.read_text(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": capture_environment(),
        "case_keys": [c.key for c in load_cases(scenario_path)],
        "flux2bench_version": __version__,
    }
    store = RunStore.create(run_dir, meta)
    (store.root / "scenario.yaml").write_text(meta["scenario_text"])
    return store, cases


def resume_run(run_dir: str | Path, blocks: list[str] | None = None) -> tuple[RunStore, list[Case]]:
    """Reopen a run directory; its cases come from the scenario text saved with it."""
    store = RunStore.open(run_dir)
    cases = load_cases(store.root / "scenario.yaml", blocks)
    meta = store.meta
    meta.setdefault("resumed", []).append({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                            "environment": capture_environment()})
    store.update_meta(meta)
    return store, cases
