"""Supervising one worker process: spawn it, follow its stages, wait with a timeout, and classify its exit.

Each worker is ``python -m flux2bench.worker`` started in its own session, so offload hooks, compile caches,
attention settings and leaked memory never carry over, and a crash, a hang or the kernel's OOM killer ends one
case only. The runner never touches CUDA.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from flux2bench.case import Case
from flux2bench.results import CaseResult, RunStore, Status
from flux2bench.trackers.memory import peaks_from_timeline
from flux2bench.worker import EVENTS_FD_ENV, PARENT_PID_ENV

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


class Workers:
    """Starts worker processes for one run directory and kills the live ones when the run stops."""

    def __init__(self, store: RunStore, worker_module: str = WORKER_MODULE, omp_threads: str | None = None):
        self.store = store
        self.worker_module = worker_module
        self.omp_threads = omp_threads
        self._live: set[subprocess.Popen] = set()
        self._guard = threading.Lock()
        self.stopping = threading.Event()

    def run(self, case: Case, device: str | None, on_stage: Callable[[str], None],
            prepare: str | None = None) -> WorkerExit:
        """Run the case (or, with ``prepare``, make that axis's artifact for it) in a worker and wait for it."""
        tmp, logs = self.store.subdir("tmp"), self.store.subdir("logs")
        suffix = f"-{prepare}" if prepare else ""
        attempt = f"{case.key}{suffix}-{os.getpid()}-{time.monotonic_ns()}"
        case_path, result_path = tmp / f"{attempt}.case.json", tmp / f"{attempt}.result.json"
        log_path = logs / f"{case.key}{suffix}.log"
        case_path.write_text(json.dumps(case.to_dict()))
        command = [sys.executable, "-m", self.worker_module, str(case_path), str(result_path), str(self.store.root)]
        if prepare:
            command += ["--prepare", prepare]
        read_fd, write_fd = os.pipe()
        env = {**os.environ, EVENTS_FD_ENV: str(write_fd), PARENT_PID_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        if self.omp_threads is not None:
            env["OMP_NUM_THREADS"] = self.omp_threads
        oom_before = _oom_kill_count()
        started_at, start = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
        with open(log_path, "w") as log, self._guard:
            if self.stopping.is_set():
                raise RuntimeError("the run is stopping")
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    pass_fds=(write_fd,), env=env, start_new_session=True)
            self._live.add(proc)
        os.close(write_fd)
        stages: list[str] = []
        reader = threading.Thread(target=_read_events, args=(read_fd, stages, on_stage), daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=case.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            with self._guard:
                self._live.discard(proc)
        reader.join(timeout=5)
        oom_after = _oom_kill_count()
        result = None if prepare else self._read_result(result_path, log_path)
        case_path.unlink(missing_ok=True)
        result_path.unlink(missing_ok=True)
        return WorkerExit(proc.returncode, timed_out, result, log_path, stages[-1] if stages else None,
                          None if oom_before is None or oom_after is None else oom_after - oom_before,
                          started_at, time.perf_counter() - start)

    def _read_result(self, result_path: Path, log_path: Path) -> CaseResult | None:
        if not result_path.exists():
            return None
        try:
            result = CaseResult.from_json(result_path.read_text())
        except ValueError:  # unreadable: classified like a worker that wrote nothing
            return None
        result.log = str(log_path.relative_to(self.store.root))
        return result

    def kill_all(self) -> None:
        with self._guard:
            for proc in self._live:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _read_events(fd: int, stages: list[str], on_stage: Callable[[str], None]) -> None:
    with os.fdopen(fd) as stream:
        for line in stream:
            try:
                stage = json.loads(line)["stage"]
            except (ValueError, KeyError, TypeError):
                continue
            stages.append(stage)
            on_stage(stage)


def classify(case: Case, exit_: WorkerExit, run_dir: Path) -> CaseResult:
    """The case's record: the worker's own, or one that says how the worker ended without writing it."""
    if exit_.result is not None:
        if exit_.timed_out:  # the measurement finished; only the process's exit hung
            exit_.result.setup.worker_exit = f"killed after timeout_s={case.timeout_s:g} while exiting"
        return exit_.result
    result = CaseResult.for_case(case, Status.ERROR, log=str(exit_.log.relative_to(run_dir)),
                                 started_at=exit_.started_at, wall_s=exit_.wall_s)
    timeline = run_dir / "timelines" / f"{case.key}.csv"
    if timeline.exists():
        result.timeline = str(timeline.relative_to(run_dir))
        result.memory = peaks_from_timeline(timeline, reason="the worker was killed before it reported")
    where = f"; last stage: {exit_.last_stage}" if exit_.last_stage else ""
    if exit_.timed_out:
        result.status, result.reason = Status.TIMEOUT, f"exceeded timeout_s={case.timeout_s:g}{where}"
    elif exit_.returncode == -signal.SIGKILL:
        evidence = ("the cgroup's oom_kill counter rose by " f"{exit_.oom_kills}" if exit_.oom_kills
                    else "not confirmed by the cgroup's memory.events")
        result.status = Status.HOST_OOM
        result.reason = f"worker killed by SIGKILL, the kernel OOM killer's signal ({evidence}){where}"
    else:
        result.reason = f"worker exited with code {exit_.returncode} without a result{where}"
        result.error = _log_tail(exit_.log)
    return result
