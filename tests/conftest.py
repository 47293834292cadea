"""Shared fixtures: scenario files, tiny cases, and runs of the isolated runner.

Workers are forked from the session's fork server (torch and diffusers imported once), yet a tiny FLUX.2 pipeline
still costs seconds to build, and a fresh worker (``worker_start="fresh"``) 10 s of imports on 2 cores, so tests
that need a run share one: ``tiny_run``, made once per session, or a module-scoped run of their own, and make
several assertions about it. A run made by ``run_scenario`` is read-only: every module is checked for having
changed none (``FinishedRun.copy_to`` gives a test a copy to change).

The tests mirror the packages (``tests/axes/`` for ``flux2bench/axes/``, ``tests/core/`` for the top-level modules,
``tests/repo/`` for what the repository ships). pytest imports each test file by its base name, so a file name is
unique across the folders. ``python3 -m pytest -m "not slow"`` is the fast lane; ``python3 -m pytest`` runs all.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flux2bench.results import CaseResult
from flux2bench.store import RunStore
from flux2bench.executors.local import LocalExecutor
from flux2bench.runner import WORKER_MODULE, Runner, SupervisorConfig, start_run
from flux2bench.scenario import Block, Case, expand_block

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent

# The smallest case that still runs the whole tiny pipeline on the CPU.
TINY: dict[str, Any] = {"model": "tiny", "device": "cpu", "resolution": 64, "steps": 1, "repeats": 1, "warmup": 0,
                        "prompts": "a red fox", "timeout_s": 300}

# The session's shared run of the real tiny pipeline (``tiny_run``). ``e2e``: a warm-up and two timed images of two
# steps; ``unknown-attention``: refused before loading; ``split``: prompt embeddings precomputed in a worker of their
# own, a warm-up and two timed images.
TINY_RUN = """
defaults:
  model: tiny
  device: cpu
  timeout_s: 300
blocks:
  e2e:
    resolution: 128
    steps: 2
    repeats: 2
    warmup: 1
  unknown-attention:
    resolution: 64
    steps: 1
    repeats: 1
    warmup: 0
    attention: no_such_backend
  split:
    resolution: 64
    steps: 2
    repeats: 2
    warmup: 1
    prompts: "a red fox"
    text_encoder: precomputed
"""


@pytest.fixture
def write_scenario(tmp_path: Path) -> Callable[..., Path]:
    """``write_scenario(text, name="scenario.yaml")``: a scenario file in tmp_path (the text is dedented)."""
    def write(text: str, name: str = "scenario.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture(scope="session")
def tiny_case() -> Callable[..., Case]:
    """``tiny_case(**axes)``: the one Case of a block of TINY with ``axes`` (scenario field names) on top."""
    def make(block: str = "tiny", **axes: Any) -> Case:
        cases = expand_block(block, Block.model_validate({**TINY, **axes}))
        assert len(cases) == 1, f"tiny_case expects one case, the axes give {len(cases)}"
        return cases[0]

    return make


@dataclass
class FinishedRun:
    """A scenario run to the end by the runner: its store, its cases and their records by block name."""

    store: RunStore
    cases: list[Case]
    results: list[CaseResult]

    def __getitem__(self, block: str) -> CaseResult:
        (result,) = [r for r in self.results if r.block == block]
        return result

    def case(self, block: str) -> Case:
        (case,) = [c for c in self.cases if c.block == block]
        return case

    def copy_to(self, path: Path) -> Path:
        """A copy of the run directory at ``path``, for a test that changes it (resumes it, edits a record)."""
        return Path(shutil.copytree(self.store.root, path, symlinks=True))


Fingerprint = dict[str, tuple[int, int]]  # each path under a run directory: its size and modification time


def _fingerprint(root: Path) -> Fingerprint:
    """A write, an addition or a removal anywhere under ``root`` changes it."""
    return {str(path.relative_to(root)): (path.lstat().st_size, path.lstat().st_mtime_ns) for path in root.rglob("*")}


def _changes(before: Fingerprint, after: Fingerprint) -> list[str]:
    return ([f"added {p}" for p in sorted(after.keys() - before.keys())]
            + [f"removed {p}" for p in sorted(before.keys() - after.keys())]
            + [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]])


@pytest.fixture(scope="session")
def finished_runs() -> dict[Path, Fingerprint]:
    """Each run directory ``run_scenario`` made, with its fingerprint as the run left it."""
    return {}


@pytest.fixture(scope="module", autouse=True)
def finished_runs_stay_unchanged(finished_runs: dict[Path, Fingerprint]) -> Iterator[None]:
    """After each module: no test changed a run that ``run_scenario`` made (tests share them)."""
    yield
    changed = []
    for root, fingerprint in finished_runs.items():
        if changes := _changes(fingerprint, now := _fingerprint(root)):
            changed.append(f"{root}: {', '.join(changes[:10])}")
            finished_runs[root] = now  # the next module is blamed only for what it changes itself
    assert not changed, f"a test of this module wrote into a shared run (copy it first): {'; '.join(changed)}"


@pytest.fixture(scope="session")
def run_scenario(tmp_path_factory: pytest.TempPathFactory,
                 finished_runs: dict[Path, Fingerprint]) -> Callable[..., FinishedRun]:
    """``run_scenario(text, name, worker_module=..., devices=...)``: validate, create a run directory, run every
    case (over the given device slots). The run directory is read-only from then on."""
    def run(text: str, name: str, worker_module: str = WORKER_MODULE, devices: list[str] | None = None) -> FinishedRun:
        root = tmp_path_factory.mktemp(name)
        scenario = root / f"{name}.yaml"
        scenario.write_text(textwrap.dedent(text))
        store, cases = start_run(scenario, run_dir=root / "run")
        runner = Runner(store, SupervisorConfig(worker_module=worker_module), executor=LocalExecutor(devices))
        results = runner.run(cases)
        finished_runs[store.root] = _fingerprint(store.root)
        return FinishedRun(store, cases, results)

    return run


@pytest.fixture(scope="session")
def tiny_run(run_scenario: Callable[..., FinishedRun]) -> FinishedRun:
    """The real tiny pipeline run once per session (``TINY_RUN``), read by every test that only reads a run."""
    return run_scenario(TINY_RUN, "tiny")


@pytest.fixture(scope="session", autouse=True)
def own_ray_instance() -> Iterator[None]:
    """Ray started without an address starts an instance of its own: by default ``ray.init()`` joins whatever local
    instance another process started (Ray finds it under /tmp/ray), and ends the joined test run a minute after that
    instance stops."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", "local")
        yield


@pytest.fixture(scope="session")
def fault_worker() -> str:
    """The name of the test worker module (tests/fault_worker.py), importable by the runner's child processes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
        yield "fault_worker"
