"""The Ray executor: each case is one Ray actor, placed by Ray on a node that has the case's GPUs (and GPU kind).

The actor supervises the case exactly as the local executor does (``CaseSupervisor``: the same isolated worker
process, the same trackers, the same classification of how it ended), in a run directory of its own on that node,
then sends back the record and the case's files (``flux2bench.executors.remote``); the driver's sink writes them
into the one run directory. Artifacts (prompt embeddings, on-disk checkpoints) are made on each node that needs
them, once per node (a file lock there). With an artifact cache (``run --cache DIR``), each node uses one too: the
same path, which on each node names that node's own cache folder. Each node's copy of the run directory is removed
when the run ends, unless ``--keep-node-dirs``.

A case runs once per request: the actor is never restarted and its calls never retried, so a node lost mid-case
gives the case ``killed`` (``run --resume --retry-failed`` reruns it). A case no node of the cluster can hold
(more GPUs than any node has, a GPU kind the cluster lacks) is deferred, not recorded: a resume on a cluster that
has what it needs runs it. Ray is imported only here: the local path never needs it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flux2bench.axes import gpu, registry
from flux2bench.executors import CaseSink, ExecutorOptions, ExecutorUnavailable, refuse_foreign
from flux2bench.executors.remote import CaseBundle, node_environment, remove_case_files
from flux2bench.identity import case_from_dict
from flux2bench.results import CaseResult, Status
from flux2bench.supervision.supervisor import CaseSupervisor, Placement, SupervisorConfig

if TYPE_CHECKING:
    from flux2bench.case import Case

# Where a node keeps its copies of run directories (artifacts, compile cache, the files of cases in flight).
NODE_DIR_ENV = "FLUX2BENCH_NODE_DIR"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ExecutorUnavailable(f"--executor ray needs Ray: pip install 'flux2bench[ray]' ({exc})") from None
    return ray


def node_run_dir(run_id: str) -> Path:
    return Path(os.environ.get(NODE_DIR_ENV) or Path(tempfile.gettempdir()) / "flux2bench-ray") / run_id


class CaseActor:
    """Runs one case on the node Ray placed it on (wrapped by ``ray.remote`` in ``RayExecutor``).

    ``config`` is the driver's supervisor configuration; its cache folder names, on this node, this node's own
    cache folder (nodes share no filesystem)."""

    def __init__(self, config: SupervisorConfig, run_id: str):
        self.config = config.on_node()
        self.root = node_run_dir(run_id)
        self.root.mkdir(parents=True, exist_ok=True)
        # Ray sets OMP_NUM_THREADS to the actor's CPUs (1); the worker gets what one local slot would give it.
        os.environ.pop("OMP_NUM_THREADS", None)

    def where(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "host": socket.gethostname(), "ray_version": ray.__version__,
                "gpu_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])]}

    def environment(self) -> dict[str, Any]:
        return node_environment()

    def run(self, case_data: dict[str, Any], placement: Placement) -> CaseBundle:
        from flux2bench.store import RunStore

        case = case_from_dict(case_data)
        remove_case_files(self.root, case.key)  # left by an earlier attempt of this case on this node
        result = CaseSupervisor(RunStore(self.root), self.config).run(case, None, placement)
        return CaseBundle.of(result, self.root)


def _remove_node_dir(run_id: str) -> str:
    shutil.rmtree(node_run_dir(run_id), ignore_errors=True)
    return socket.gethostname()


def _run_id(run_dir: Path) -> str:
    """The run directory's name on the nodes; a hash tells apart two run directories of one name (two drivers)."""
    return f"{run_dir.name}-{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]}"


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

    def __init__(self, address: str | None = None, poll_s: float = 0.5, keep_node_dirs: bool = False):
        self.ray = _import_ray()
        self.address = address
        self.poll_s = poll_s
        self.keep_node_dirs = keep_node_dirs
        if address not in (None, "auto"):
            _check_reachable(address)

    @classmethod
    def from_options(cls, options: ExecutorOptions) -> RayExecutor:
        refuse_foreign(options, ("address", "keep_node_dirs"))
        return cls(options.address, keep_node_dirs=options.keep_node_dirs)

    def _connect(self) -> bool:
        """Join or start Ray; True when this call started it (and so must stop it)."""
        if self.ray.is_initialized():
            return False
        quiet = {"logging_level": logging.ERROR, "log_to_driver": False}  # nothing between the progress lines
        try:
            if self.address is None:  # a new instance of its own, never one another process started on this host
                self.ray.init(address="local", include_dashboard=False, **quiet)
            else:
                self.ray.init(address=self.address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ExecutorUnavailable(f"cannot join the Ray cluster at {self.address or 'a new local instance'}: "
                                      f"{exc}") from None
        return True

    def unplaceable(self, case: Case) -> str | None:
        return None  # the cluster's nodes are known once it is joined: ``execute`` defers what none can hold

    def execute(self, cases: list[Case], supervisor: CaseSupervisor, sink: CaseSink) -> None:
        started = self._connect()
        run_id = _run_id(supervisor.store.root)
        used: set[str] = set()
        try:
            self._execute(cases, supervisor.config, run_id, sink, used)
        finally:
            if not self.keep_node_dirs:
                self._clean_nodes(run_id, used)
            if started:
                self.ray.shutdown()

    def _execute(self, cases: list[Case], config: SupervisorConfig, run_id: str, sink: CaseSink,
                 used: set[str]) -> None:
        actor_class = self.ray.remote(max_restarts=0, max_task_retries=0)(CaseActor)
        nodes = _alive_nodes(self.ray)
        in_flight: list[_InFlight] = []
        try:
            for case in cases:
                if (reason := unplaceable(case, nodes)) is not None:
                    sink.deferred(case, reason)
                    continue
                actor = actor_class.options(**resources(case)).remote(config, run_id)
                in_flight.append(_InFlight(case, actor, actor.where.remote()))
            while in_flight:
                self._step(in_flight, nodes, sink, used)
        except BaseException:  # Ctrl-C, or a failure of the driver: no case keeps running on the cluster
            for flight in in_flight:
                self.ray.kill(flight.actor, no_restart=True)
            raise

    def _step(self, in_flight: list[_InFlight], nodes: dict[str, dict[str, Any]], sink: CaseSink,
              used: set[str]) -> None:
        pending = [f.run if f.run is not None else f.where for f in in_flight]
        ready, _ = self.ray.wait(pending, num_returns=1, timeout=self.poll_s)
        for ref in ready:
            flight = next(f for f in in_flight if ref in (f.where, f.run))
            if ref is flight.where:
                self._started(flight, nodes, sink, used)
            else:
                in_flight.remove(flight)
                self._finished(flight, sink)
                self.ray.kill(flight.actor, no_restart=True)

    def _started(self, flight: _InFlight, nodes: dict[str, dict[str, Any]], sink: CaseSink, used: set[str]) -> None:
        try:
            where = self.ray.get(flight.where)
        except self.ray.exceptions.RayError:  # the actor died before it started: _finished says how
            flight.run = flight.where
            return
        used.add(where["node_id"])
        node = nodes.get(where["node_id"]) or _alive_nodes(self.ray).get(where["node_id"], {})
        if not sink.knows_node(where["node_id"]):
            sink.note_node(where["node_id"], {"host": where["host"], "ray_version": where["ray_version"],
                                              "environment": self._environment(flight)})
        flight.placement = Placement("ray", where["host"], where["node_id"], _node_gpu_kind(node),
                                     where["ray_version"])
        sink.started(flight.case, f"{where['host']}:{','.join(where['gpu_ids']) or 'cpu'}")
        flight.run = flight.actor.run.remote(flight.case.to_dict(), flight.placement)

    def _environment(self, flight: _InFlight) -> dict[str, Any]:
        try:
            environment: dict[str, Any] = self.ray.get(flight.actor.environment.remote())
        except self.ray.exceptions.RayError as exc:
            environment = {"unavailable": {"environment": f"not captured on the node: {exc}"}}
        return environment

    def _finished(self, flight: _InFlight, sink: CaseSink) -> None:
        try:
            bundle: CaseBundle = self.ray.get(flight.run)
        except self.ray.exceptions.RayError as exc:
            where = (f"on node {flight.placement.node_id} ({flight.placement.host})" if flight.placement
                     else "before it started on a node")
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            sink.finished(CaseResult.for_case(
                flight.case, Status.KILLED, reason=f"the Ray worker running the case was lost {where}: {first_line}; "
                                                  "run --resume --retry-failed runs it again"))
            return
        bundle.deliver(sink)

    def _clean_nodes(self, run_id: str, node_ids: set[str]) -> None:
        """Remove each used node's copy of the run directory (a node lost meanwhile keeps its copy)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remove = self.ray.remote(num_cpus=0)(_remove_node_dir)
        alive = _alive_nodes(self.ray)
        refs = [remove.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(run_id)
                for node_id in node_ids if node_id in alive]
        try:
            self.ray.get(refs, timeout=60)
        except self.ray.exceptions.RayError:
            pass  # a copy left behind takes disk space, never a result


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse, at once, a HOST:PORT that nothing answers on: Ray itself would wait minutes for it."""
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
    """Why no node of the cluster can hold the case now (None when one can)."""
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
            f"{', '.join(offered)}); a case runs on the GPUs of one node: run --resume on a cluster that has one")
