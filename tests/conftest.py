"""Shared fixtures: scenario files, tiny cases, and runs of the isolated runner.

Workers are forked from the session's fork server (torch and diffusers imported once), yet a tiny FLUX.2 pipeline
still costs seconds to build, and a fresh worker (``worker_start="fresh"``) 10 s of imports on 2 cores, so tests
that need a run share one module-scoped run and make several assertions about it.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
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

# The smallest case that still runs the whole tiny pipeline on the CPU.
TINY: dict[str, Any] = {"model": "tiny", "device": "cpu", "resolution": 64, "steps": 1, "repeats": 1, "warmup": 0,
                        "prompts": "a red fox", "timeout_s": 300}


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


@pytest.fixture(scope="session")
def run_scenario(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., FinishedRun]:
    """``run_scenario(text, name, worker_module=..., devices=...)``: validate, create a run directory, run every
    case (over the given device slots)."""
    def run(text: str, name: str, worker_module: str = WORKER_MODULE, devices: list[str] | None = None) -> FinishedRun:
        root = tmp_path_factory.mktemp(name)
        scenario = root / f"{name}.yaml"
        scenario.write_text(textwrap.dedent(text))
        store, cases = start_run(scenario, run_dir=root / "run")
        return FinishedRun(store, cases, Runner(store, SupervisorConfig(worker_module=worker_module),
                                                    executor=LocalExecutor(devices)).run(cases))

    return run


@pytest.fixture(scope="session")
def fault_worker() -> str:
    """The name of the test worker module (tests/fault_worker.py), importable by the runner's child processes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
        yield "fault_worker"
