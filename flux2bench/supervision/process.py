"""Supervising one worker process: spawn it, follow its stages, wait with a timeout, and classify its exit.

Each worker is its own process in its own session (``flux2bench.worker``, forked by the run's fork server or started
as a fresh interpreter: ``fork_server``), so offload hooks, compile caches, attention settings and leaked memory never
carry over, and a crash, a hang or the kernel's OOM killer ends one case only. The runner never touches CUDA.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from flux2bench import child_env
from flux2bench.axes import registry
from flux2bench.axes.checkpoint import CACHE_ENV as CHECKPOINTS_ENV
from flux2bench.case import Case
from flux2bench.fork_server import DEFAULT_START, ForkedWorker, ForkServer, StartMethod, shared_server
from flux2bench.fork_server_log import LOG_NAME
from flux2bench.overhead import complete
from flux2bench.results import CaseResult, RankRecord, Status, highest_peaks, summed_energy
from flux2bench.safe_files import open_fresh, write_atomic
from flux2bench.store import RunStore, rank_suffix
from flux2bench.trackers.memory import peaks_from_timeline

WORKER_MODULE = "flux2bench.worker"
# Signals another process sends to end a worker; SIGABRT or SIGSEGV mean the worker crashed by itself (an error).
KILLING_SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
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
    worker_start: StartMethod = "fresh"
    killed_by: str | None = None  # what ended the worker from outside, where the runner knows (its fork server)


def _kill_group(pid: int) -> None:
    """SIGKILL a worker's process group (its session); a forked worker not yet in its own session, by itself."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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


@dataclass
class _Rank:
    rank: int
    result: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def merge_ranks(results: list[CaseResult | None]) -> CaseResult | None:
    """Rank 0's record, with every rank's memory and energy beside it, its peaks the highest of any rank and its
    energy the sum over the GPUs. None when rank 0 wrote nothing."""
    first = results[0]
    if first is None or len(results) == 1:
        return first
    first.ranks = [RankRecord(r, result.setup.gpu, result.status, result.memory, result.energy)
                   for r, result in enumerate(results) if result is not None]
    first.memory = highest_peaks([rank.memory for rank in first.ranks])
    first.energy = summed_energy([rank.energy for rank in first.ranks])
    return first


Process = subprocess.Popen[bytes] | ForkedWorker


class Workers:
    """Starts worker processes for one run directory and kills the live ones when the run stops. ``worker_start``:
    forked by this process's fork server (``fork_server``) where it works, or always a fresh interpreter."""

    def __init__(self, store: RunStore, worker_module: str = WORKER_MODULE, omp_threads: str | None = None,
                 worker_start: StartMethod = DEFAULT_START, checkpoints: Path | None = None,
                 cache: Path | None = None):
        self.store = store
        self.worker_module = worker_module
        self.omp_threads = omp_threads
        self.checkpoints = checkpoints
        self.cache = cache
        self.fork_server: ForkServer | None = shared_server() if worker_start == "fork-server" else None
        self._live: set[Process] = set()
        self._guard = threading.Lock()
        self.stopping = threading.Event()

    def run(self, case: Case, device: str | None, on_stage: Callable[[str], None],
            prepare: str | None = None, cgroup_path: Path | None = None) -> WorkerExit:
        """Run the case (or, with ``prepare``, make that axis's artifact for it) and wait for it: one worker, or one
        per GPU (rank) for a case split over several GPUs; inside the cgroup ``cgroup_path`` (a RAM cap), if given."""
        tmp, logs = self.store.subdir("tmp"), self.store.subdir("logs")
        suffix = f"-{prepare}" if prepare else ""
        attempt = tmp / f"{case.key}{suffix}-{os.getpid()}-{time.monotonic_ns()}"
        case_path = attempt.with_name(attempt.name + ".case.json")
        write_atomic(case_path, json.dumps(case.to_dict()))
        world = 1 if prepare else registry.gpus(case)
        ranks = [_Rank(r, attempt.with_name(f"{attempt.name}{rank_suffix(r)}.result.json"),
                       logs / f"{case.key}{suffix}{rank_suffix(r)}.log") for r in range(world)]
        env = self._environment(device, world, cgroup_path)
        read_fd, write_fd = os.pipe()
        oom_before = _oom_kill_count()
        started_at, start = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
        # a wait for the server's imports is part of the start
        forked = self._forks(cgroup_path, on_stage, case.timeout_s)
        procs = [self._start(case_path, rank, env, write_fd if rank.rank == 0 else None, prepare, forked, start,
                             case.timeout_s) for rank in ranks]
        os.close(write_fd)
        stages: list[str] = []
        reader = threading.Thread(target=_read_events, args=(read_fd, stages, on_stage), daemon=True)
        reader.start()
        timed_out = self._wait(procs, case.timeout_s)
        reader.join(timeout=5)
        oom_after = _oom_kill_count()
        results = [self._read_result(rank.result, rank.log) for rank in ranks]
        for path in [case_path, *(rank.result for rank in ranks)]:
            path.unlink(missing_ok=True)
        failed = next((p for p in procs if p.returncode != 0), procs[0])  # a rank that failed explains the case
        assert failed.returncode is not None, "every rank was waited for"
        return WorkerExit(failed.returncode, timed_out, merge_ranks(results), ranks[procs.index(failed)].log,
                          stages[-1] if stages else None,
                          None if oom_before is None or oom_after is None else oom_after - oom_before,
                          started_at, time.perf_counter() - start,
                          "fork-server" if isinstance(procs[0], ForkedWorker) else "fresh",
                          next((p.ended_with_server for p in procs
                                if isinstance(p, ForkedWorker) and p.ended_with_server), None))

    def _forks(self, cgroup_path: Path | None, on_stage: Callable[[str], None], timeout_s: float = 600.0) -> bool:
        """Whether this worker is forked: a fork server that works here (its answer awaited at most the case's
        ``timeout_s``), and no RAM cap (see ``fork_server``). The server's output goes to the run's logs."""
        if self.fork_server is None or cgroup_path is not None:
            return False
        self.fork_server.log.attach(self.store.subdir("logs") / LOG_NAME)
        if not self.fork_server.answered():
            on_stage("waiting for the fork server's imports")
        return self.fork_server.state(timeout_s).usable

    def _environment(self, device: str | None, world: int, cgroup_path: Path | None) -> dict[str, str]:
        """A worker's whole environment: the caller's, less flux2bench's internal variables, which the worker takes
        from here alone (the one place a setting travels to a child process through the environment)."""
        inherited = {name: value for name, value in os.environ.items() if name not in child_env.INTERNAL}
        env = {**inherited, child_env.PARENT_PID: str(os.getpid()), "PYTHONUNBUFFERED": "1",
               # one compile cache per run directory: a rerun of the directory finds it warm
               "TORCHINDUCTOR_CACHE_DIR": str(self.store.root / "compile-cache"),
               "TRITON_CACHE_DIR": str(self.store.root / "compile-cache" / "triton"),
               child_env.ARTIFACT_CACHE: str(self.cache or self.store.root / "compile-cache" / "artifacts")}
        if self.checkpoints is not None:
            env[CHECKPOINTS_ENV] = str(self.checkpoints)
        if cgroup_path is not None:
            env[child_env.CGROUP] = str(cgroup_path)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        if self.omp_threads is not None:
            env["OMP_NUM_THREADS"] = self.omp_threads
        if world > 1:  # what torchrun sets
            env |= {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        return env

    def _start(self, case_path: Path, rank: _Rank, env: dict[str, str], events_fd: int | None,
               prepare: str | None, forked: bool, spawned: float, timeout_s: float) -> Process:
        args = [str(case_path), str(rank.result), str(self.store.root)] + (["--prepare", prepare] if prepare else [])
        env = {**env, **({"RANK": str(rank.rank), "LOCAL_RANK": str(rank.rank)} if "WORLD_SIZE" in env else {})}
        if events_fd is not None:
            env[child_env.EVENTS_FD] = str(events_fd)
        if self.stopping.is_set():
            raise RuntimeError("the run is stopping")
        env[child_env.SPAWNED_AT] = repr(spawned)
        proc: Process
        if forked and self.fork_server is not None and (forked_proc := self.fork_server.spawn(
                self.worker_module, args, env, rank.log, events_fd, timeout_s)):
            proc = forked_proc
        else:
            log = open_fresh(rank.log)  # a new file: a link at its name is replaced, never written through
            try:
                proc = subprocess.Popen([sys.executable, "-m", self.worker_module, *args], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        pass_fds=() if events_fd is None else (events_fd,), start_new_session=True)
            finally:
                os.close(log)
        with self._guard:  # a stop that came while it started ends it too
            self._live.add(proc)
            if self.stopping.is_set():
                _kill_group(proc.pid)
        return proc

    def _wait(self, procs: list[Process], timeout_s: float) -> bool:
        """Wait for every rank; when one fails, the others may wait for it forever in a collective: end them."""
        deadline = time.monotonic() + timeout_s
        timed_out = False
        try:
            while any(p.poll() is None for p in procs):
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                if any(p.returncode not in (None, 0) for p in procs):
                    break
                time.sleep(0.05)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    _kill_group(proc.pid)
                proc.wait()
                with self._guard:
                    self._live.discard(proc)
        return timed_out

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
                _kill_group(proc.pid)


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
        if exit_.result.wall_split is not None:
            complete(exit_.result.wall_split, exit_.wall_s, artifacts_s=0.0)
            exit_.result.wall_split.worker_start = exit_.worker_start
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
    elif exit_.killed_by:
        result.status, result.reason = Status.KILLED, f"worker killed: {exit_.killed_by}{where}"
    elif exit_.returncode == -signal.SIGKILL and exit_.oom_kills:
        result.status = Status.HOST_OOM
        result.reason = (f"worker killed by the kernel's OOM killer (the cgroup's oom_kill counter rose by "
                         f"{exit_.oom_kills}){where}")
    elif -exit_.returncode in KILLING_SIGNALS:
        signame = signal.Signals(-exit_.returncode).name
        evidence = ("the cgroup's memory.events is not readable here" if exit_.oom_kills is None
                    else "the cgroup's oom_kill counter did not rise")
        result.status = Status.KILLED
        result.reason = f"worker killed by {signame} from outside ({evidence}){where}"
    else:
        result.reason = f"worker exited with code {exit_.returncode} without a result{where}"
        result.error = _log_tail(exit_.log)
    return result
