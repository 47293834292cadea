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
from queue import Empty, Queue
from typing import Callable

from flux2bench import __version__
from flux2bench.drift import (METRIC_NAMES, apply_thresholds, baseline_case, baseline_identity, compare_outputs,
                              drift_label, is_baseline, needs_drift, pick_baseline)
from flux2bench.results import CaseResult, Drift, Metric, RunStore
from flux2bench.scenario import Case, DriftThresholds, load_cases
from flux2bench.trackers.environment import capture_environment
from flux2bench.trackers.memory import compress_timeline, peaks_from_timeline
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
    """Callbacks the CLI's progress display hooks into; all optional. ``device`` is the worker's
    CUDA_VISIBLE_DEVICES value (None: inherited). With several devices they are called from several threads."""

    on_case_start: Callable[[Case, str | None], None] = lambda case, device: None
    on_stage: Callable[[Case, str], None] = lambda case, stage: None
    on_case_end: Callable[[CaseResult], None] = lambda result: None
    on_drift: Callable[[CaseResult], None] = lambda result: None
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


class _KeyedLocks:
    """One lock per key, so that two device slots never compute the same prompt embeddings at once."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def __call__(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


class Runner:
    """Runs cases in worker processes, one case per device slot at a time, then measures drift.

    ``devices`` are CUDA_VISIBLE_DEVICES values, one slot each (e.g. ``["0", "1"]`` runs two cases at
    a time on two GPUs); the default, ``[None]``, runs one case at a time with the inherited environment.
    Drift is measured after every case has run, so it does not depend on the order the cases finish in.
    """

    def __init__(self, store: RunStore, worker_module: str = WORKER_MODULE, progress: RunProgress | None = None,
                 devices: list[str] | None = None):
        self.store = store
        self.worker_module = worker_module
        self.progress = progress or RunProgress()
        self.devices: list[str | None] = list(devices) if devices else [None]
        self._embedding_locks = _KeyedLocks()
        self._live: set[subprocess.Popen] = set()
        self._live_guard = threading.Lock()
        self._stopping = threading.Event()

    def omp_threads(self) -> str | None:
        """The workers' OpenMP threads: inherited, or with several slots the CPUs shared out, not oversubscribed."""
        if "OMP_NUM_THREADS" in os.environ or len(self.devices) == 1:
            return os.environ.get("OMP_NUM_THREADS")
        return str(max(1, (os.cpu_count() or 1) // len(self.devices)))

    def run(self, cases: list[Case]) -> list[CaseResult]:
        """Run the cases without a record, then attach drift to every record that still lacks it."""
        done = self.store.completed_keys()
        pending = [c for c in cases if c.key not in done]
        self.progress.skipped.extend(c.key for c in cases if c.key in done)
        self._measure(pending)
        self._run_missing_baselines(cases)
        records = self.store.results()
        for case, result in self._awaiting_drift(cases, records):
            self._attach_drift(case, result, records)
        by_key = {r.key: r for r in records}
        return [by_key[c.key] for c in pending]

    # --- measuring ---------------------------------------------------------------------------------

    def _measure(self, cases: list[Case]) -> None:
        """Run the cases over the device slots, each slot taking the next case when its last one ends."""
        queue: Queue[Case] = Queue()
        for case in cases:
            queue.put(case)
        finished: Queue[CaseResult | BaseException] = Queue()

        def slot(device: str | None) -> None:
            try:
                while not self._stopping.is_set():
                    try:
                        case = queue.get_nowait()
                    except Empty:
                        return
                    self.progress.on_case_start(case, device)
                    result = self.run_case(case, device)
                    self.store.write(result)
                    self.progress.on_case_end(result)
                    finished.put(result)
            except BaseException as exc:  # surfaced in the main thread
                finished.put(exc)

        threads = [threading.Thread(target=slot, args=(d,), daemon=True) for d in self.devices[:len(cases)]]
        for thread in threads:
            thread.start()
        try:
            for _ in cases:
                item = finished.get()
                if isinstance(item, BaseException):
                    raise item
        except BaseException:  # Ctrl-C, a kill of the runner or a slot's failure: take the workers down too
            self._stopping.set()
            self._kill_live_workers()
            raise
        for thread in threads:
            thread.join()

    def run_case(self, case: Case, device: str | None = None) -> CaseResult:
        """One case in a worker on ``device``, after the prompt-embedding step if it needs one."""
        result = self._embed(case, device) or self._classify(case, self._spawn(case, device))
        if result.timeline is not None and result.timeline.endswith(".csv"):
            result.timeline = compress_timeline(self.store.root, result.timeline)
        result.setup["runner"] = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES") if device is None
                                  else device, "concurrent_slots": len(self.devices),
                                  "omp_num_threads": self.omp_threads()}
        return result

    def _embed(self, case: Case, device: str | None) -> CaseResult | None:
        """Compute and cache a precomputed case's prompt embeddings once; a failure becomes the case's record."""
        if case.text_encoder != "precomputed":
            return None
        cache = embedding_cache_path(self.store.root, case)
        with self._embedding_locks(str(cache)):
            if cache.exists():
                return None
            embedding = self._spawn(case, device, embed=True)
        if embedding.returncode == 0 and not embedding.timed_out:
            return None
        failed = self._classify(case, embedding)
        failed.reason = f"prompt-embedding step failed: {failed.reason}"
        return failed

    # --- drift -------------------------------------------------------------------------------------

    @staticmethod
    def _awaiting_drift(cases: list[Case], results: list[CaseResult]) -> list[tuple[Case, CaseResult]]:
        """The cases whose record is ok, changes numerics, wants drift and has none yet, or had no baseline to
        compare with when it was last looked at (a resumed run may have measured one since)."""
        records = {r.key: r for r in results}

        def awaits(case: Case, record: CaseResult | None) -> bool:
            return (record is not None and case.drift_baseline != "off" and record.status == "ok"
                    and (record.drift is None or record.drift.baseline_key is None) and needs_drift(record.case))

        return [(c, records[c.key]) for c in cases if awaits(c, records.get(c.key))]

    def _run_missing_baselines(self, cases: list[Case]) -> None:
        """Run each missing bf16 baseline once (no offload; model offload where that did not fit), named after
        the first case that needs it."""
        wanted = [(c, r) for c, r in self._awaiting_drift(cases, self.store.results()) if c.drift_baseline == "run"]
        for offload in ("none", "model"):
            results = self.store.results()
            tried = {(baseline_identity(r.case), r.case["offload"]): r.status for r in results if is_baseline(r.case)}
            baselines: dict[tuple, Case] = {}  # baseline identity -> the baseline case to run
            for case, result in wanted:
                identity = baseline_identity(result.case)
                if pick_baseline(result.case, results) is not None or (identity, offload) in tried:
                    continue
                # model offload only where the no-offload baseline ran out of memory or cannot run
                if offload == "none" or tried.get((identity, "none")) in ("oom", "unsupported"):
                    baselines.setdefault(identity, _baseline_of(case, offload))
            self._measure(list(baselines.values()))

    def _attach_drift(self, case: Case, result: CaseResult, records: list[CaseResult]) -> None:
        """Compare an ok case that changes numerics with its bf16 baseline among ``records`` and store the verdict."""
        baseline = pick_baseline(result.case, records)
        if baseline is None:
            reason = ("no ok bf16 baseline with the same model, prompts, seeds, geometry and steps "
                      f"(drift_baseline: {case.drift_baseline})")
            result.drift = Drift(None, drift_label(case.weights),
                                 {name: Metric.missing("against the bf16 baseline", reason) for name in METRIC_NAMES})
        else:
            result.drift = compare_outputs(self.store.root, result, baseline)
            result.drift.failed = apply_thresholds(result.drift, DriftThresholds(**dict(case.drift_thresholds)))
            if result.drift.failed:
                result.status = "drift_fail"
                result.reason = "drift thresholds broken: " + ", ".join(result.drift.failed)
        self.store.write(result)
        self.progress.on_drift(result)

    # --- one worker process ------------------------------------------------------------------------

    def _spawn(self, case: Case, device: str | None, embed: bool = False) -> WorkerExit:
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
        env = {**os.environ, EVENTS_FD_ENV: str(write_fd), "PYTHONUNBUFFERED": "1"}
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        if (threads := self.omp_threads()) is not None:
            env["OMP_NUM_THREADS"] = threads
        oom_before = _oom_kill_count()
        started_at, start = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
        with open(log_path, "w") as log, self._live_guard:
            if self._stopping.is_set():
                raise RuntimeError("the run is stopping")
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    pass_fds=(write_fd,), env=env, start_new_session=True)
            self._live.add(proc)
        os.close(write_fd)
        stages: list[str] = []
        reader = threading.Thread(target=self._read_events, args=(read_fd, case, stages), daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=case.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            with self._live_guard:
                self._live.discard(proc)
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

    def _kill_live_workers(self) -> None:
        with self._live_guard:
            for proc in self._live:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _read_events(self, fd: int, case: Case, stages: list[str]) -> None:
        with os.fdopen(fd) as stream:
            for line in stream:
                try:
                    stage = json.loads(line)["stage"]
                except (ValueError, KeyError):
                    continue
                stages.append(stage)
                self.progress.on_stage(case, stage)

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


def _baseline_of(case: Case, offload: str) -> Case:
    """The case's bf16 baseline with the given offload, stored under the block ``<block>.baseline``."""
    data = {**baseline_case(case.to_dict()), "offload": offload, "block": f"{case.block}.baseline", "key": ""}
    return Case.from_dict(data)


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
