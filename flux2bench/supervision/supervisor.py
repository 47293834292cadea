"""The case supervisor: one case from its artifacts to its record, in its isolated worker process, wherever an
executor placed it (this host, or a node of a cluster that runs a supervisor of its own).

It makes the artifacts the case needs (``artifacts``), runs the worker under a RAM cap where an axis asks for one,
classifies how the worker ended (``process``) and notes where the case ran. It never touches CUDA.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from flux2bench import cgroup
from flux2bench.artifact_cache import ArtifactCache
from flux2bench.axes import gpu, registry
from flux2bench.axes.checkpoint import CACHE_ENV as CHECKPOINTS_ENV
from flux2bench.axes.checkpoint import checkpoints_root
from flux2bench.case import Case
from flux2bench.errors import MachineLacks
from flux2bench.fork_server import DEFAULT_START, ServerState, StartMethod
from flux2bench.results import CaseResult, RunnerSlot
from flux2bench.store import RunStore
from flux2bench.supervision.artifacts import Artifacts
from flux2bench.supervision.process import WORKER_MODULE, Workers, classify
from flux2bench.trackers.memory import compress_timeline


@dataclass(frozen=True)
class Placement:
    """Where a case's worker ran: which executor placed it, on which host (and cluster node), on which kind of GPU."""

    executor: str
    host: str
    node_id: str | None = None
    gpu_kind: str | None = None
    ray_version: str | None = None

    @classmethod
    def here(cls, executor: str = "local") -> Placement:
        return cls(executor, socket.gethostname())


def omp_threads(slots: int) -> str | None:
    """The workers' OpenMP threads: the user's ``OMP_NUM_THREADS``, or with several slots the CPUs shared out, not
    oversubscribed."""
    if "OMP_NUM_THREADS" in os.environ or slots == 1:
        return os.environ.get("OMP_NUM_THREADS")
    return str(max(1, (os.cpu_count() or 1) // slots))


@dataclass(frozen=True)
class SupervisorConfig:
    """How cases are supervised; plain data, so that a remote executor sends it to the nodes it runs cases on.

    ``cache``: the artifact cache folder (prompt embeddings, on-disk checkpoints, compiled code) across runs, or None.
    ``checkpoints``: the folder of on-disk checkpoints (None: the cache's, else ``$FLUX2BENCH_CHECKPOINTS``, else
    ``~/.cache/flux2bench/checkpoints``). ``worker_start``: workers forked by a fork server that imported their
    libraries once (``fork_server``), or fresh interpreters. ``omp_threads``: the workers' ``OMP_NUM_THREADS``.
    """

    worker_module: str = WORKER_MODULE
    worker_start: StartMethod = DEFAULT_START
    cache: Path | None = None
    checkpoints: Path | None = None
    omp_threads: str | None = None

    def checkpoints_folder(self) -> Path:
        if self.checkpoints is not None:
            return self.checkpoints
        if self.cache is None or os.environ.get(CHECKPOINTS_ENV):  # the user's choice comes before the cache's
            return checkpoints_root()
        return ArtifactCache(self.cache).checkpoints_dir

    def on_node(self) -> SupervisorConfig:
        """This configuration for a node that runs one case per process: a fork server would import once for one
        worker, and gain nothing."""
        return replace(self, worker_start="fresh")


class CaseSupervisor:
    """Runs cases of one run directory, each in its own worker process; ``on_stage`` hears each stage a worker
    reports. Thread-safe: a local executor runs one case per device slot at a time."""

    def __init__(self, store: RunStore, config: SupervisorConfig | None = None,
                 on_stage: Callable[[Case, str], None] = lambda case, stage: None,
                 on_warning: Callable[[str], None] | None = None):
        self.store = store
        self.config = config or SupervisorConfig()
        self.on_stage = on_stage
        checkpoints = self.config.checkpoints_folder()
        self.workers = Workers(store, self.config.worker_module, self.config.omp_threads, self.config.worker_start,
                               checkpoints, self.config.cache)
        cache = ArtifactCache(self.config.cache, on_warning) if self.config.cache is not None else None
        self.artifacts = Artifacts(store, self.workers, cache, checkpoints)

    @property
    def stopping(self) -> threading.Event:
        """Set once the run stops (Ctrl-C, a failure): no worker starts after it."""
        return self.workers.stopping

    def stop(self) -> None:
        """End every live worker (the run is stopping)."""
        self.stopping.set()
        self.workers.kill_all()

    def start_fork_server(self) -> None:
        """Start the fork server's imports now, while the first artifacts and checks run (if workers fork)."""
        if self.workers.fork_server is not None:
            self.workers.fork_server.start()

    def fork_server_state(self) -> ServerState | None:
        """What the fork server's probe found (None when workers start fresh)."""
        return self.workers.fork_server.state() if self.workers.fork_server is not None else None

    def run(self, case: Case, device: str | None = None, placement: Placement | None = None,
            slots: int = 1) -> CaseResult:
        """The case's record: its artifacts made, then its worker run on ``device`` (a CUDA_VISIBLE_DEVICES value;
        None: inherited). ``placement`` says where the executor put it (this host, by default); ``slots``, how many
        cases it runs at a time there."""
        on_stage: Callable[[str], None] = lambda stage: self.on_stage(case, stage)  # noqa: E731
        artifact_walls: list[float] = []
        result = self.artifacts.prepare(case, device, on_stage, artifact_walls)
        if result is None:
            result = self._measure(case, device, on_stage)
        if result.wall_split is not None:
            result.wall_split.artifacts_s = float(sum(artifact_walls))
        self._compress_timelines(case, result)
        visible = device if device is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
        placement = placement or Placement.here()
        result.setup.runner = RunnerSlot(visible, slots, self.workers.omp_threads, placement.executor, placement.host,
                                         placement.node_id, placement.gpu_kind or gpu.kind_of(result.setup.gpu),
                                         placement.ray_version)
        return result

    def _compress_timelines(self, case: Case, result: CaseResult) -> None:
        root = self.store.root
        for timeline in (root / "timelines").glob(f"{case.key}.rank*.csv"):  # the other ranks'
            compress_timeline(root, str(timeline.relative_to(root)))
        if result.timeline is not None and result.timeline.endswith(".csv"):
            result.timeline = compress_timeline(root, result.timeline)

    def _measure(self, case: Case, device: str | None, on_stage: Callable[[str], None]) -> CaseResult:
        """The case's worker, inside a memory-capped cgroup when an axis limits its RAM."""
        limit = registry.ram_limit_bytes(case)
        if limit is None:
            return classify(case, self.workers.run(case, device, on_stage), self.store.root)
        try:
            capped = cgroup.create(f"flux2bench-{os.getpid()}-{case.key}", limit)
        except cgroup.CgroupUnavailable as exc:
            return CaseResult.unsupported(case, MachineLacks(f"max_ram_gib needs a cgroup v2: {exc}"))
        try:
            ended = self.workers.run(case, device, on_stage, cgroup_path=capped.path)
            ended.oom_kills = capped.oom_kills()  # the cap's own count, not the whole host's
            result = classify(case, ended, self.store.root)
            result.setup.axes["ram_cap"] = capped.record()
            return result
        finally:
            capped.remove()
