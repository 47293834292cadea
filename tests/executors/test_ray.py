"""The Ray executor, on a real Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``).

Each worker node advertises a GPU kind as Ray does (``accelerator_type:H100``) without having a GPU: the cases run
on the CPU, which is what placement, the files that travel back and failure handling need.
"""

from __future__ import annotations

import json
import os
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flux2bench.artifact_cache import ArtifactCache
from flux2bench.executors import ExecutorOptions, ExecutorUnavailable, make_executor
from flux2bench.executors.local import LocalExecutor
from flux2bench.report import build_report
from flux2bench.results import Status
from flux2bench.runner import Runner, SupervisorConfig, RunProgress, resume_run, start_run

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from flux2bench.executors.ray import RayExecutor  # noqa: E402

KINDS = ("H100", "H200")
# device auto: a case that names a GPU kind cannot also name the CPU (the fake nodes place it on this machine)
FAULT = {"model": "tiny", "device": "auto", "resolution": 64, "steps": 1, "repeats": 1, "warmup": 0, "timeout_s": 120}


def _node(kind: str) -> dict[str, Any]:
    return {"num_cpus": 1, "resources": {f"accelerator_type:{kind}": 1}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fault_worker: str) -> Iterator[tuple[Cluster, dict[str, Any]]]:
    """A head without CPUs (it runs no case) and one node per GPU kind; the fault worker importable on every node."""
    release = tmp_path_factory.mktemp("release") / "release"
    os.environ["FAULT_RELEASE_FILE"] = str(release)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = {kind: cluster.add_node(**_node(kind)) for kind in KINDS}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        yield cluster, {"nodes": nodes, "release": release}
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("FAULT_RELEASE_FILE", None)


def _scenario(tmp_path: Path, blocks: dict[str, dict[str, Any]], name: str = "ray") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, "defaults": FAULT, "blocks": blocks}))
    return path


def _node_kinds() -> dict[str, str]:
    return {node["NodeID"]: kind for node in ray.nodes() if node["Alive"]
            for kind in KINDS if f"accelerator_type:{kind}" in node["Resources"]}


@pytest.mark.slow
def test_each_case_runs_on_a_node_of_its_gpu_kind_and_its_files_come_back(cluster, tmp_path, fault_worker):
    scenario = _scenario(tmp_path, {"kinds": {"prompts": "FAULT:none", "gpu": list(KINDS)}})
    store, cases = start_run(scenario, run_dir=tmp_path / "run")
    results = Runner(store, SupervisorConfig(worker_module=fault_worker), executor=RayExecutor(poll_s=0.1)).run(cases)

    kinds = _node_kinds()
    assert sorted(r.case.settings["gpu"] for r in results) == sorted(KINDS)
    for result in results:
        assert result.status == Status.OK, result.reason
        slot = result.setup.runner
        assert (slot.executor, slot.gpu_kind) == ("ray", result.case.settings["gpu"])
        assert kinds[slot.node_id] == result.case.settings["gpu"]
        assert slot.ray_version == ray.__version__ and slot.host
        for output in result.outputs:  # the image drift needs, written on the node, is in the driver's run dir
            assert (store.root / output.image).is_file() and (store.root / output.latents).is_file()
        assert (store.root / result.log).is_file() and (store.root / result.timeline).is_file()
    assert build_report(store.root).html.is_file()


# What differs between a Ray run and a local run of the same scenario, by design: where the case ran, and how its
# worker started (one fresh interpreter per Ray actor; the local executor forks from the run's fork server).
PLACEMENT = ("executor", "host", "node_id", "gpu_kind", "ray_version")


def _measurement_free(value: Any) -> Any:
    """A record with every measured number (a float: a time, a peak, a bandwidth) replaced by a marker: whatever is
    left (keys, labels, statuses, methods, reasons, paths, counts, sample counts, which values were measured) must be
    the same wherever the case ran."""
    if isinstance(value, dict):
        return {k: _measurement_free(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_measurement_free(v) for v in value]
    return "<measured>" if isinstance(value, float) else value


@pytest.mark.slow
def test_a_ray_run_directory_holds_what_a_local_run_of_the_same_scenario_holds(cluster, tmp_path, fault_worker):
    scenario = _scenario(tmp_path, {"plain": {"prompts": "FAULT:none", "seeds": [1, 2]}})
    runs = {}
    for executor in ("local", "ray"):
        store, cases = start_run(scenario, run_dir=tmp_path / executor)
        Runner(store, SupervisorConfig(worker_module=fault_worker),
               executor=LocalExecutor() if executor == "local" else RayExecutor(poll_s=0.1)).run(cases)
        records = {p.name: json.loads(p.read_text()) for p in (store.root / "results").glob("*.json")}
        files = {str(p.relative_to(store.root)): p for p in store.root.rglob("*")
                 if p.is_file() and p.parts[len(store.root.parts)] in ("results", "images", "latents", "logs",
                                                                        "timelines")
                 and p.name != "fork-server.log"}  # the local run's fork server's own output
        runs[executor] = (records, files)
    (local_records, local_files), (ray_records, ray_files) = runs["local"], runs["ray"]
    assert local_records.keys() == ray_records.keys() and sorted(local_files) == sorted(ray_files)
    for name in (n for n in local_files if n.startswith("images/")):  # the same images, byte for byte
        assert local_files[name].read_bytes() == ray_files[name].read_bytes(), name
    for name, record in ray_records.items():
        local = local_records[name]
        assert record["setup"]["runner"]["executor"] == "ray" and local["setup"]["runner"]["executor"] == "local"
        assert record["wall_split"].pop("worker_start") == "fresh"
        local["wall_split"].pop("worker_start")
        for side in (record, local):
            side.pop("started_at")  # a clock reading, like the measured numbers
            for field in PLACEMENT:
                side["setup"]["runner"].pop(field)
        assert _measurement_free(record) == _measurement_free(local)
        assert len(record["latency"]["steps"]) == len(local["latency"]["steps"]) == 2  # one timed image per seed


@pytest.mark.slow
def test_with_a_cache_the_node_keeps_the_prompt_embeddings_in_its_cache_at_the_drivers_path(cluster, tmp_path,
                                                                                              fault_worker):
    """The driver's cache path names the node's own cache folder (here the nodes share this machine's disk)."""
    scenario = _scenario(tmp_path, {"cached": {"prompts": "FAULT:none", "text_encoder": "precomputed", "gpu": "H100"}})
    cache = ArtifactCache(tmp_path / "cache")
    made_embeddings = []
    for name in ("cold", "warm"):
        store, cases = start_run(scenario, run_dir=tmp_path / name)
        (result,) = Runner(store, SupervisorConfig(worker_module=fault_worker, cache=cache.root),
                            executor=RayExecutor(poll_s=0.1)).run(cases)
        assert result.status == Status.OK, result.reason
        made_embeddings.append((store.root / "logs" / f"{result.key}-text_encoder.log").is_file())
        assert result.wall_split.artifacts_s > 0 if name == "cold" else result.wall_split.artifacts_s == 0
    assert made_embeddings == [True, False]  # the warm run's node restored them from its cache
    assert len(list((tmp_path / "cache" / "entries").iterdir())) == 1


@pytest.mark.slow
def test_a_case_no_node_can_hold_is_deferred_with_the_reason_and_not_recorded(cluster, tmp_path, fault_worker):
    """A fact about the cluster, not about the setup: a resume on a cluster that has such a node runs it."""
    scenario = _scenario(tmp_path, {"b200": {"prompts": "FAULT:none", "gpu": "B200"},
                                    "two-gpus": {"prompts": "FAULT:none", "device": "cuda", "parallel": "ulysses",
                                                 "gpus": 2}})
    store, cases = start_run(scenario, run_dir=tmp_path / "run")
    progress = RunProgress()
    assert Runner(store, SupervisorConfig(worker_module=fault_worker), executor=RayExecutor(),
                  progress=progress).run(cases) == []
    reasons = {c.block: progress.deferred[c.key] for c in cases}
    assert "no node of the Ray cluster has kind B200" in reasons["b200"]
    assert "has 2 GPUs" in reasons["two-gpus"] and "H100 x0" in reasons["two-gpus"]
    assert store.results() == []


@pytest.mark.slow
def test_a_node_lost_mid_case_gives_killed_and_a_resume_finishes_the_run(cluster, tmp_path, fault_worker):
    cluster_, state = cluster
    scenario = _scenario(tmp_path, {"paused": {"prompts": "FAULT:pause", "gpu": "H100"}})
    store, cases = start_run(scenario, run_dir=tmp_path / "run")

    node = state["nodes"]["H100"]

    def remove_its_node_once_the_worker_runs(case, device) -> None:
        threading.Timer(4.0, cluster_.remove_node, args=(node,)).start()

    progress = RunProgress(on_case_start=remove_its_node_once_the_worker_runs)
    (result,) = Runner(store, SupervisorConfig(worker_module=fault_worker), progress=progress,
                         executor=RayExecutor(poll_s=0.1)).run(cases)
    assert result.status == Status.KILLED
    assert f"lost on node {node.node_id}" in result.reason

    state["nodes"]["H100"] = cluster_.add_node(**_node("H100"))
    cluster_.wait_for_nodes()
    state["release"].touch()
    store, cases = resume_run(store.root)
    (rerun,) = Runner(store, SupervisorConfig(worker_module=fault_worker), retry_failed=True,
                        executor=RayExecutor(poll_s=0.1)).run(cases)
    assert rerun.status == Status.OK
    assert store.results()[0].status == Status.OK


def test_without_ray_the_ray_executor_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(ExecutorUnavailable, match=r"pip install 'flux2bench\[ray\]'"):
        make_executor(ExecutorOptions(name="ray"))


def test_the_cli_refuses_ray_without_ray_with_exit_2(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from flux2bench.cli import app

    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    scenario = tmp_path / "s.yaml"
    scenario.write_text(textwrap.dedent("""
        name: s
        defaults: {model: tiny, device: cpu, resolution: 64, steps: 1}
        blocks: {a: {}}
    """))
    result = CliRunner().invoke(app, ["run", str(scenario), "--out", str(tmp_path / "runs"), "--executor", "ray"])
    assert result.exit_code == 2
    assert "flux2bench[ray]" in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_address_nothing_answers_on_is_refused_at_once_before_a_run_directory_exists(tmp_path):
    from typer.testing import CliRunner

    from flux2bench.cli import app

    scenario = _scenario(tmp_path, {"a": {"prompts": "FAULT:none"}})
    result = CliRunner().invoke(app, ["run", str(scenario), "--out", str(tmp_path / "runs"), "--executor", "ray",
                                      "--address", "127.0.0.1:1"])
    assert result.exit_code == 2 and "no Ray cluster answers there" in result.output
    assert not (tmp_path / "runs").exists()
