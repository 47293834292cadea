"""The Ray executor: each case is one Ray actor, placed by Ray on a node that has the case's GPUs (and GPU kind).

The actor runs the case exactly as the local executor does (``Runner.run_case``: the same isolated worker process,
the same trackers, the same classification of how it ended), in a run directory of its own on that node, then
sends back the record and every file the worker wrote for the case (log, timelines, images and latents that
drift needs). The driver writes them into the one run directory through its store, under its run lock: nodes share
no filesystem, and the driver's run directory is the single source of truth. Artifacts (prompt embeddings,
on-disk checkpoints) are made on each node that needs them, once per node (a file lock there). When the driver was
given an artifact cache (``run --cache DIR``), each actor uses one too: the same path, which on each node names that
node's own cache folder (nodes share no filesystem; a node keeps its cache between runs as a CI runner does).

A case runs once per request: the actor is never restarted and its calls never retried, so a node lost mid-case
gives the case ``killed`` (``run --resume --retry-failed`` reruns it). A case no node of the cluster can ever
hold (more GPUs than any node has, a GPU kind the cluster lacks) is ``unsupported`` with the reason rather than
waiting forever. Ray is imported only here: the local path never needs it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flux2bench.axes import gpu, registry
from flux2bench.case import Case
from flux2bench.executors import ExecutorUnavailable, Placement
from flux2bench.results import CaseResult, Status

if TYPE_CHECKING:
    from flux2bench.runner import Runner

# Where a node keeps its copy of a run directory (artifacts, compile cache, the files of cases in flight).
NODE_DIR_ENV = "FLUX2BENCH_NODE_DIR"
# The run-directory folders whose files of one case travel back to the driver.
CASE_FOLDERS = ("logs", "timelines", "images", "latents", "profiles")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ExecutorUnavailable(f"--executor ray needs Ray: pip install 'flux2bench[ray]' ({exc})") from None
    return ray


def case_files(root: Path, key: str) -> dict[str, bytes]:
    """Every file a worker wrote for the case ``key`` under ``root``, by its path relative to ``root``."""
    files = {}
    for folder in CASE_FOLDERS:
        for path in sorted((root / folder).glob(f"{key}[.-]*")):
            if path.is_file():
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


@dataclass
class CaseBundle:
    """What a node sends back for one case: its record and the files the record and drift need."""

    record: str
    files: dict[str, bytes] = field(default_factory=dict)


class CaseActor:
    """Runs one case on the node Ray placed it on (wrapped by ``ray.remote`` in ``RayExecutor``).

    ``cache_dir`` is the driver's artifact cache folder (None: no cache). The path is read on this node: it names
    this node's own cache folder, made there if missing, not the driver's (nodes share no filesystem)."""

    def __init__(self, runner_class: type[Runner], run_id: str, worker_module: str, driver_omp_threads: str | None,
                 cache_dir: str | None = None):
        self.runner_class = runner_class  # the driver's, sent by reference: this module never imports the runner
        base = Path(os.environ.get(NODE_DIR_ENV) or Path(tempfile.gettempdir()) / "flux2bench-ray")
        self.root = base / run_id
        self.root.mkdir(parents=True, exist_ok=True)
        self.worker_module = worker_module
        self.cache_dir = cache_dir
        # Ray sets OMP_NUM_THREADS to the actor's CPUs (1); the worker gets what one local slot would give it.
        os.environ.pop("OMP_NUM_THREADS", None)
        if driver_omp_threads is not None:
            os.environ["OMP_NUM_THREADS"] = driver_omp_threads

    def where(self) -> dict[str, Any]:
        import socket

        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "host": socket.gethostname(), "ray_version": ray.__version__,
                "gpu_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])]}

    def environment(self) -> dict[str, Any]:
        """This node's environment (GPUs, driver, libraries), captured in a short-lived process so that no CUDA
        context outlives it beside the case's worker."""
        import json
        import subprocess
        import sys

        script = "import json; from flux2bench.trackers.environment import capture_environment as c; " \
                 "print(json.dumps(c(), default=str))"
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
        environment: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return environment

    def run(self, case_data: dict[str, Any], placement: Placement) -> CaseBundle:
        from flux2bench.artifact_cache import ArtifactCache
        from flux2bench.store import RunStore

        case = Case.from_dict(case_data)
        for stale in case_files(self.root, case.key):  # left by an earlier attempt of this case on this node
            (self.root / stale).unlink(missing_ok=True)
        cache = ArtifactCache(Path(self.cache_dir)) if self.cache_dir else None
        # One case per actor: a fork server would import once for one worker, and gain nothing.
        runner = self.runner_class(RunStore(self.root), worker_module=self.worker_module, cache=cache,
                                   worker_start="fresh")
        with runner.checkpoints_in_cache():
            result = runner.run_case(case, None, placement)
        return CaseBundle(result.to_json(), case_files(self.root, case.key))


def _run_dir_tag(run_dir: Path) -> str:
    """Tells apart, on a node, two run directories of the same name (made by two drivers)."""
    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]


@dataclass
class _InFlight:
    case: Case
    actor: Any
    where: Any
    run: Any | None = None
    placement: Placement | None = None


class RayExecutor:
    """Places each case on a Ray cluster: ``address`` ``auto`` joins the running one, an address joins that one,
    None starts a local Ray instance (and stops it when the run ends)."""

    name = "ray"
    slots = 1  # each worker gets its OpenMP threads as with one local slot

    def __init__(self, address: str | None = None, poll_s: float = 0.5):
        self.ray = _import_ray()
        self.address = address
        self.poll_s = poll_s
        if address not in (None, "auto"):
            _check_reachable(address)

    def _connect(self) -> bool:
        """Join or start Ray; True when this call started it (and so must stop it)."""
        if self.ray.is_initialized():
            return False
        try:
            if self.address is None:
                self.ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            else:
                self.ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ExecutorUnavailable(f"cannot join the Ray cluster at {self.address or 'a new local instance'}: "
                                      f"{exc}") from None
        return True

    def execute(self, runner: Runner, cases: list[Case]) -> None:
        started = self._connect()
        try:
            self._execute(runner, cases)
        finally:
            if started:
                self.ray.shutdown()

    def _execute(self, runner: Runner, cases: list[Case]) -> None:
        ray = self.ray
        actor_class = ray.remote(max_restarts=0, max_task_retries=0)(CaseActor)
        run_id = f"{runner.store.root.name}-{_run_dir_tag(runner.store.root)}"
        omp = os.environ.get("OMP_NUM_THREADS")
        cache_dir = str(runner.cache.root) if runner.cache is not None else None
        nodes = _alive_nodes(ray)
        in_flight: list[_InFlight] = []
        try:
            for case in cases:
                if (reason := unplaceable(case, nodes)) is not None:
                    runner.record(CaseResult.for_case(case, Status.UNSUPPORTED, reason=reason))
                    continue
                actor = actor_class.options(**resources(case)).remote(type(runner), run_id, runner.worker_module,
                                                                      omp, cache_dir)
                in_flight.append(_InFlight(case, actor, actor.where.remote()))
            while in_flight:
                self._step(runner, in_flight, nodes)
        except BaseException:  # Ctrl-C, or a failure of the driver: no case keeps running on the cluster
            for flight in in_flight:
                ray.kill(flight.actor, no_restart=True)
            raise

    def _step(self, runner: Runner, in_flight: list[_InFlight], nodes: dict[str, dict[str, Any]]) -> None:
        ray = self.ray
        pending = [f.run if f.run is not None else f.where for f in in_flight]
        ready, _ = ray.wait(pending, num_returns=1, timeout=self.poll_s)
        for ref in ready:
            flight = next(f for f in in_flight if ref in (f.where, f.run))
            if ref is flight.where:
                self._started(runner, flight, nodes)
            else:
                in_flight.remove(flight)
                runner.record(self._finished(runner, flight))
                ray.kill(flight.actor, no_restart=True)

    def _started(self, runner: Runner, flight: _InFlight, nodes: dict[str, dict[str, Any]]) -> None:
        try:
            where = self.ray.get(flight.where)
        except self.ray.exceptions.RayError:  # the actor died before it started: _finished says how
            flight.run = flight.where
            return
        node = nodes.get(where["node_id"]) or _alive_nodes(self.ray).get(where["node_id"], {})
        self._note_node(runner, flight, where)
        flight.placement = Placement("ray", where["host"], where["node_id"], _node_gpu_kind(node),
                                     where["ray_version"])
        runner.progress.on_case_start(flight.case, f"{where['host']}:{','.join(where['gpu_ids']) or 'cpu'}")
        flight.run = flight.actor.run.remote(flight.case.to_dict(), flight.placement)

    def _note_node(self, runner: Runner, flight: _InFlight, where: dict[str, Any]) -> None:
        """Record in run.json, once per node, the environment cases measured on it ran in: the driver's own
        (run.json's ``environment``) need not be any node's."""
        meta = runner.store.meta
        nodes = meta.setdefault("nodes", {})
        if where["node_id"] in nodes:
            return
        try:
            environment = self.ray.get(flight.actor.environment.remote())
        except self.ray.exceptions.RayError as exc:
            environment = {"unavailable": {"environment": f"not captured on the node: {exc}"}}
        nodes[where["node_id"]] = {"host": where["host"], "ray_version": where["ray_version"],
                                   "environment": environment}
        runner.store.update_meta(meta)

    def _finished(self, runner: Runner, flight: _InFlight) -> CaseResult:
        try:
            bundle: CaseBundle = self.ray.get(flight.run)
        except self.ray.exceptions.RayError as exc:
            where = (f"on node {flight.placement.node_id} ({flight.placement.host})" if flight.placement
                     else "before it started on a node")
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return CaseResult.for_case(flight.case, Status.KILLED,
                                       reason=f"the Ray worker running the case was lost {where}: {first_line}; "
                                              "run --resume --retry-failed runs it again")
        for name, data in bundle.files.items():
            runner.store.put_file(name, data)
        return CaseResult.from_json(bundle.record)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse, at once, a HOST:PORT that nothing answers on: Ray itself would wait minutes for it."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except ValueError:
        raise ExecutorUnavailable(f"--address {address!r}: expected auto or HOST:PORT (e.g. 10.0.0.1:6379)") from None
    except OSError as exc:
        raise ExecutorUnavailable(f"--address {address}: no Ray cluster answers there ({exc})") from None


def resources(case: Case) -> dict[str, Any]:
    """What the case's actor asks Ray for: one CPU, its GPUs when it runs on CUDA, and its GPU kind when it
    names one."""
    options: dict[str, Any] = {"num_cpus": 1, "num_gpus": registry.gpus(case) if case.device.startswith("cuda")
                               else 0}
    if (kind := gpu.AXIS.kind(case)) is not None:
        options["resources"] = {gpu.resource_name(kind): 0.001}
    return options


def _alive_nodes(ray: Any) -> dict[str, dict[str, Any]]:
    return {node["NodeID"]: node for node in ray.nodes() if node.get("Alive")}


def _node_gpu_kind(node: dict[str, Any]) -> str | None:
    prefix = gpu.resource_name("")
    kinds = sorted(name.removeprefix(prefix) for name in node.get("Resources", {}) if name.startswith(prefix))
    return "+".join(kinds) or None


def unplaceable(case: Case, nodes: dict[str, dict[str, Any]]) -> str | None:
    """Why no node of the cluster can ever hold the case (None when one can)."""
    wanted = resources(case)
    need_gpus, kind = wanted["num_gpus"], gpu.AXIS.kind(case)

    def holds(node: dict[str, Any]) -> bool:
        have = node.get("Resources", {})
        return (have.get("CPU", 0) >= 1 and have.get("GPU", 0) >= need_gpus
                and (kind is None or have.get(gpu.resource_name(kind), 0) > 0))

    if any(holds(node) for node in nodes.values()):
        return None
    offered = sorted({f"{_node_gpu_kind(n) or 'no GPU kind'} x{int(n.get('Resources', {}).get('GPU', 0))}"
                      for n in nodes.values()})
    asked = " of ".join(filter(None, [f"{need_gpus} GPU{'s' if need_gpus != 1 else ''}" if need_gpus else "",
                                       f"kind {kind}" if kind else ""]))
    return (f"no node of the Ray cluster has {asked} (its {len(nodes)} node{'s' if len(nodes) != 1 else ''}: "
            f"{', '.join(offered)}); a case runs on the GPUs of one node")
