"""The isolated runner: one fresh worker process per case, outcomes classified, results stored durably, then drift.

Three jobs, one module each: supervising a worker (``process``), placing cases (an executor,
``flux2bench.executors``) and the drift plan (``drift_plan``). ``Runner`` ties them together; ``start_run`` and
``resume_run`` open the run directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from flux2bench import __version__, cgroup
from flux2bench.artifact_cache import ArtifactCache
from flux2bench.axes import gpu, registry
from flux2bench.axes.checkpoint import CACHE_ENV as CHECKPOINTS_ENV
from flux2bench.case import Case
from flux2bench.errors import MachineLacks
from flux2bench.executors import Executor, Placement
from flux2bench.executors.local import LocalExecutor, omp_threads
from flux2bench.results import CaseResult, RunnerSlot, Status
from flux2bench.store import RunStore, write_atomic
from flux2bench.runner.drift_plan import attach_drift, baselines_to_run, drift_to_attach
from flux2bench.fork_server import StartMethod
from flux2bench.runner.process import WORKER_MODULE, Workers, classify
from flux2bench.scenario import load_cases
from flux2bench.trackers.environment import capture_environment
from flux2bench.trackers.memory import compress_timeline

__all__ = ["WORKER_MODULE", "RunProgress", "Runner", "run_dir_stem", "resume_run", "start_run"]

# What ``retry_failed`` runs again: the harness or the machine broke, not the setup (oom and unsupported are results).
RETRIED = (Status.ERROR, Status.TIMEOUT, Status.KILLED)


@dataclass
class RunProgress:
    """Callbacks the CLI's progress display hooks into; all optional. ``device`` is the worker's
    CUDA_VISIBLE_DEVICES value (None: inherited). With several devices they are called from several threads."""

    on_case_start: Callable[[Case, str | None], None] = lambda case, device: None
    on_stage: Callable[[Case, str], None] = lambda case, stage: None
    on_case_end: Callable[[CaseResult], None] = lambda result: None
    on_drift: Callable[[CaseResult], None] = lambda result: None
    on_set_aside: Callable[[Path, str], None] = lambda path, reason: None  # an invalid record moved aside
    # a case this machine (or cluster) cannot place, not run and not recorded: a resume elsewhere runs it
    on_deferred: Callable[[Case, str], None] = lambda case, reason: None
    skipped: list[str] = field(default_factory=list)
    deferred: dict[str, str] = field(default_factory=dict)


@contextmanager
def _artifact_lock(locks: Path, path: Path) -> Iterator[None]:
    """Held while the artifact ``path`` is made: two device slots, or two Ray workers of one node, never make it at
    once (an flock on a file in ``locks``, which separate opens of one process contend for too; not beside the
    artifact, whose folder, e.g. the checkpoints folder, holds artifacts only)."""
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "r+") as lock:  # a link in the run directory is never followed
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Runner:
    """Runs cases in worker processes placed by an executor, then measures drift.

    The executor decides where and when each case runs: by default the local one, over ``devices``
    (CUDA_VISIBLE_DEVICES values, one slot each: ``["0", "1"]`` runs two cases at a time on two GPUs; the default,
    ``[None]``, one case at a time with the inherited environment); ``executor`` may be another (e.g. Ray's).
    ``cache`` keeps pure-input artifacts (prompt embeddings, on-disk checkpoints) across runs. ``worker_start``:
    workers forked by a fork server that imported their libraries once (``fork_server``), or fresh interpreters.
    """

    def __init__(self, store: RunStore, worker_module: str = WORKER_MODULE, progress: RunProgress | None = None,
                 devices: list[str] | None = None, retry_failed: bool = False, executor: Executor | None = None,
                 cache: ArtifactCache | None = None, worker_start: StartMethod = "fork-server"):
        self.store = store
        self.cache = cache
        self.progress = progress or RunProgress()
        self.retry_failed = retry_failed
        self.executor: Executor = executor or LocalExecutor(devices)
        self.worker_module = worker_module
        slots = getattr(self.executor, "slots", 1)
        self.workers = Workers(store, worker_module, omp_threads(slots), worker_start)

    def run(self, cases: list[Case], measure: bool = True) -> list[CaseResult]:
        """Run the cases without a record (with ``retry_failed``, also those whose record failed), then attach
        drift to every record that still lacks it. Holds the run directory for the whole run. With ``measure``
        False nothing runs: only the drift of finished cases is attached (e.g. after the images of a run made in
        several parts were brought together)."""
        with self.store.locked(), self.checkpoints_in_cache():
            self.store.clean_tmp()
            for path, reason in self.store.set_aside_invalid().items():
                self.progress.on_set_aside(path, reason)
            return self._run(cases, measure)

    @contextmanager
    def checkpoints_in_cache(self) -> Iterator[None]:
        """With a cache and no checkpoint folder chosen, the checkpoints of ``weights: checkpoint`` live in the cache,
        one folder per library versions (the runner and its workers read the variable). Held around a whole run
        (``run``), or around one case where an executor calls ``run_case`` itself (Ray's actor)."""
        if self.cache is None or os.environ.get(CHECKPOINTS_ENV):
            yield
            return
        os.environ[CHECKPOINTS_ENV] = str(self.cache.checkpoints_dir)
        try:
            yield
        finally:
            del os.environ[CHECKPOINTS_ENV]

    def _run(self, cases: list[Case], measure: bool) -> list[CaseResult]:
        done = {key for key, record in self.store.records().valid.items()
                if not (self.retry_failed and record.status in RETRIED) and not record.machine_lacks}
        pending = [c for c in cases if c.key not in done] if measure else []
        self.progress.skipped.extend(c.key for c in cases if c.key in done)
        server = self.workers.fork_server
        if pending and server is not None:
            server.start()  # imports in the background while the first artifacts and checks run
        self._measure(pending)
        for attempt in range(len(registry.baseline_attempts()) if measure else 0):
            self._measure(baselines_to_run(cases, self.store.results(), attempt))
        records = self.store.results()
        for case, result in drift_to_attach(self.store.root, cases, self._run_dir_cases(), records):
            self.store.write(attach_drift(self.store.root, case, result, records))
            self.progress.on_drift(result)
        if pending and server is not None:
            self._note_fork_server(server.state().to_dict())
        by_key = {r.key: r for r in records}  # attach_drift updated these records in place
        return [by_key[c.key] for c in pending if c.key in by_key]  # a deferred case has no record

    def _note_fork_server(self, state: dict[str, object]) -> None:
        """run.json's ``fork_server``: one entry per runner session that ran cases (whether workers were forked, how
        long the server took to import, why not)."""
        meta = self.store.meta
        meta.setdefault("fork_server", []).append(
            {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **state})
        self.store.update_meta(meta)

    def _run_dir_cases(self) -> list[Case]:
        """Every case of the scenario saved with the run directory (none for a store made without one)."""
        scenario = self.store.root / "scenario.yaml"
        return load_cases(scenario) if scenario.exists() else []

    def _measure(self, cases: list[Case]) -> None:
        if cases:
            self.executor.execute(self, cases)

    def record(self, result: CaseResult) -> None:
        """Store a finished case's record (the executor calls this as each case ends)."""
        self.store.write(result)
        self.progress.on_case_end(result)

    def defer(self, case: Case, reason: str) -> None:
        """A case the executor cannot place here: not run and not recorded, so that a resume elsewhere runs it. A
        machine condition, like a record marked ``machine_lacks`` (a worker that found the machine lacking), which a
        resume runs again too; a run whose every case is one of the two exits 3."""
        self.progress.deferred[case.key] = reason
        self.progress.on_deferred(case, reason)

    def run_case(self, case: Case, device: str | None = None, placement: Placement | None = None,
                 slots: int = 1) -> CaseResult:
        """One case in a worker on ``device``, after the artifacts it needs (e.g. prompt embeddings) exist.

        ``placement`` says where the executor put it (this host, by default); ``slots``, how many cases it runs at
        a time there."""
        on_stage = lambda stage: self.progress.on_stage(case, stage)  # noqa: E731
        artifact_walls: list[float] = []
        result = self._prepare(case, device, on_stage, artifact_walls)
        if result is None:
            result = self._measure_case(case, device, on_stage)
        if result.wall_split is not None:
            result.wall_split.artifacts_s = float(sum(artifact_walls))
        for timeline in (self.store.root / "timelines").glob(f"{case.key}.rank*.csv"):  # the other ranks'
            compress_timeline(self.store.root, str(timeline.relative_to(self.store.root)))
        if result.timeline is not None and result.timeline.endswith(".csv"):
            result.timeline = compress_timeline(self.store.root, result.timeline)
        visible = device if device is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
        placement = placement or Placement.here()
        result.setup.runner = RunnerSlot(visible, slots, self.workers.omp_threads, placement.executor, placement.host,
                                         placement.node_id, placement.gpu_kind or gpu.kind_of(result.setup.gpu),
                                         placement.ray_version)
        return result

    def _measure_case(self, case: Case, device: str | None, on_stage: Callable[[str], None]) -> CaseResult:
        """The case's worker, inside a memory-capped cgroup when an axis limits its RAM."""
        limit = registry.ram_limit_bytes(case)
        if limit is None:
            return classify(case, self.workers.run(case, device, on_stage), self.store.root)
        try:
            capped = cgroup.create(f"flux2bench-{os.getpid()}-{case.key}", limit)
        except cgroup.CgroupUnavailable as exc:
            return CaseResult.unsupported(case, MachineLacks(f"max_ram_gib needs a cgroup v2: {exc}"))
        try:
            ended = self.workers.run(case, device, on_stage, environment={cgroup.ENV: str(capped.path)})
            ended.oom_kills = capped.oom_kills()  # the cap's own count, not the whole host's
            result = classify(case, ended, self.store.root)
            result.setup.axes["ram_cap"] = capped.record()
            return result
        finally:
            capped.remove()

    def _prepare(self, case: Case, device: str | None, on_stage: Callable[[str], None],
                 walls: list[float]) -> CaseResult | None:
        """Make each missing artifact of the case once, in its own worker (its wall appended to ``walls``); a failure
        becomes the case's record."""
        for axis in registry.AXES:
            path = axis.artifact(case, self.store.root)
            if path is None:
                continue
            with _artifact_lock(self.store.subdir("locks"), path), self._cache_lock(axis.name, path):
                if self._have(axis.name, path, on_stage):
                    continue
                made = self.workers.run(case, device, on_stage, prepare=axis.name)
                if self._cached(path) and made.returncode == 0 and made.result is None and path.exists():
                    self.cache.store(axis.name, path)
            walls.append(made.wall_s)
            if made.result is not None:  # the step found that the case cannot run here
                return made.result
            if made.returncode != 0 or made.timed_out:
                failed = classify(case, made, self.store.root)
                failed.reason = f"{axis.name} step failed: {failed.reason}"
                return failed
        return None

    def _cached(self, path: Path) -> bool:
        """Whether the cache keeps this artifact: a file (copied in and out) or a folder inside the cache."""
        return self.cache is not None and (self.cache.in_place(path) or bool(path.suffix))

    @contextmanager
    def _cache_lock(self, axis: str, path: Path) -> Iterator[None]:
        """One maker per cache key across run directories (the artifact lock is per run directory)."""
        if not self._cached(path):
            yield
            return
        with self.cache.lock(axis, path):
            yield

    def _have(self, axis: str, path: Path, on_stage: Callable[[str], None]) -> bool:
        """Whether the artifact is there to use: made earlier in this run directory, or restored from the cache (a
        stale or corrupt cache entry is removed and the artifact made again)."""
        if not self._cached(path) or (path.exists() and not self.cache.in_place(path)):
            return path.exists()
        state = self.cache.restore(axis, path)
        on_stage(f"{axis} from the cache: {state}")
        return state == "hit"


def run_dir_stem(scenario_path: Path) -> str:
    """A new run directory's name before any suffix: the scenario's name and the UTC second the run starts."""
    return f"{scenario_path.stem}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def start_run(scenario_path: str | Path, run_dir: Path | None = None, out_root: str | Path = "reports",
              blocks: list[str] | None = None, label: str | None = None) -> tuple[RunStore, list[Case]]:
    """Validate the scenario, then create the run directory with run.json (nothing is created for a bad file).
    ``label`` names the code under test where it is not flux2bench's own (e.g. another repository's commit)."""
    scenario_path = Path(scenario_path)
    cases = load_cases(scenario_path, blocks)
    meta = {
        "scenario_path": str(scenario_path),
        "scenario_text": scenario_path.read_text(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": capture_environment(),
        "case_keys": [c.key for c in load_cases(scenario_path)],
        "flux2bench_version": __version__,
        **({"label": label} if label is not None else {}),
    }
    if run_dir is None:
        store = RunStore.create_unique(Path(out_root), run_dir_stem(scenario_path), meta)
    else:
        store = RunStore.create(run_dir, {**meta, "run_id": Path(run_dir).name})
    write_atomic(store.root / "scenario.yaml", meta["scenario_text"])
    return store, cases


def resume_run(run_dir: str | Path, blocks: list[str] | None = None) -> tuple[RunStore, list[Case]]:
    """Reopen a run directory; its cases come from the scenario text saved with it."""
    store = RunStore.open(run_dir)
    cases = load_cases(store.root / "scenario.yaml", blocks)
    meta = store.meta
    meta["case_keys"] = [c.key for c in load_cases(store.root / "scenario.yaml")]
    meta.setdefault("resumed", []).append({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                            "environment": capture_environment()})
    store.update_meta(meta)
    return store, cases
