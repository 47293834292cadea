"""Builders of synthetic run directories and case records, for tests that need runs with known numbers.

``make_case`` makes one CaseResult from plain numbers, ``make_run`` writes a run directory holding
such cases (run.json + results/<key>.json, exactly as the runner does), and ``noisy`` draws
realistic latency samples (log-normal noise with an occasional slow outlier).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from flux2bench.case import Case
from flux2bench.compare import Run, RunInfo
from flux2bench.results import CaseResult, Drift, Latency, Metric, PhaseMemory, Setup, Status
from flux2bench.store import RunStore

from records import BASE_CASE

ENVIRONMENT: dict[str, Any] = {
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "gpu_memory_gib": 79.2,
    "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "compute_capability": "9.0"}],
    "driver": "550.54.15",
    "cuda": "12.4",
    "python": "3.11.7",
    "platform": "Linux-5.15.0-x86_64-with-glibc2.35",
    "cpu": "AMD EPYC 9654 96-Core Processor",
    "cpu_count": 16,
    "host_ram_gib": 125.8,
    "versions": {"torch": "2.7.1", "diffusers": "0.42.0", "transformers": "5.0.0", "accelerate": "1.8.1",
                 "bitsandbytes": "0.46.0", "torchao": "0.12.0", "flux2bench": "0.1.0"},
    "git_commit": "0123456789abcdef0123456789abcdef01234567",
    "unavailable": {},
}
MEMORY_FIELDS = ("gpu_allocated_peak_gib", "gpu_reserved_peak_gib", "gpu_device_peak_gib", "host_rss_peak_gib",
                 "host_anon_peak_gib", "host_file_peak_gib", "host_pinned_peak_gib")
STEPS = 4
STEP_SHARE = 0.9  # of an image's seconds spent in the denoising steps


def environment(**changes: Any) -> dict[str, Any]:
    """ENVIRONMENT with top-level fields changed; ``versions={...}`` updates library versions."""
    env = copy.deepcopy(ENVIRONMENT)
    env["versions"].update(changes.pop("versions", {}))
    env.update(changes)
    return env


def phase_memory(**peaks: float | None) -> PhaseMemory:
    """A PhaseMemory from GiB values by field name; fields not given (or None) are not measured."""
    unknown = set(peaks) - set(MEMORY_FIELDS)
    assert not unknown, f"unknown memory fields {unknown}"
    return PhaseMemory(**{name: Metric(peaks[name], "test") if peaks.get(name) is not None
                          else Metric.missing("test", "not measured in this test") for name in MEMORY_FIELDS})


def noisy(rng: np.random.Generator, median: float, n: int, cv: float, outlier_p: float = 0.02) -> list[float]:
    """``n`` latency samples around ``median``: log-normal with ``cv``, each slowed 20-60% with probability ``outlier_p``."""
    samples = median * np.exp(rng.normal(0.0, cv, n))
    outliers = rng.random(n) < outlier_p
    samples[outliers] *= rng.uniform(1.2, 1.6, outliers.sum())
    return samples.tolist()


def make_case(key: str, *, block: str | None = None, status: str = "ok", image_s: list[float] | None = None,
              memory: dict[str, float | None] | None = None, drift: dict[str, float] | None = None,
              label: str | None = None, reason: str | None = None, setting: dict[str, Any] | None = None,
              device: str | None = None, gpu: str | None = None) -> CaseResult:
    """One case record. ``image_s``: seconds per timed image (its steps share STEP_SHARE of it evenly);
    ``memory``: inference-phase peaks in GiB by field name; ``drift``: metric name to value; ``setting``: axis options
    of the case; ``device``: the device the worker ran on; ``gpu``: the GPU model it was measured on."""
    block = block or key.split("-")[0]
    latency = None
    if image_s is not None:
        steps = [[s * STEP_SHARE / STEPS] * STEPS for s in image_s]
        latency = Latency("cuda_event", load_s=10.0, warmup_s=[max(image_s, default=1.0)],
                          stages={"image": list(image_s)}, steps=steps)
    case = Case.from_dict({**BASE_CASE, **(setting or {}), "block": block, "steps": STEPS, "key": key})
    return CaseResult(
        key=key, block=block, label=label or f"case {key}", case=case, status=Status(status), reason=reason,
        setup=Setup(device=device, gpu=gpu),
        memory={"inference": phase_memory(**memory)} if memory is not None else {},
        latency=latency,
        drift=Drift("bf16-reference", "bf16", {m: Metric(v, "test") for m, v in drift.items()}) if drift else None,
    )


def with_changes(case: CaseResult, **changes: Any) -> CaseResult:
    """A copy of a case record with some fields replaced."""
    return replace(copy.deepcopy(case), **changes)


def make_run(root: Path, name: str, cases: list[CaseResult], environment: dict[str, Any] | None = None,
             case_keys: list[str] | None = None) -> Path:
    """Write run directory ``root/name`` holding ``cases``; ``case_keys`` (the scenario order) defaults to theirs."""
    meta = {
        "run_id": name,
        "scenario_path": "scenarios/ci.yaml",
        "scenario_text": "blocks: {}\n",
        "created_at": "2025-06-01T12:00:00+00:00",
        "environment": environment or ENVIRONMENT,
        "case_keys": case_keys if case_keys is not None else [c.key for c in cases],
        "flux2bench_version": "0.1.0",
    }
    store = RunStore.create(root / name, meta)
    for case in cases:
        store.write(case)
    return store.root


def run_in_memory(name: str, cases: list[CaseResult], environment: dict[str, Any] | None = None) -> Run:
    """The loaded form of ``make_run``'s directory, without touching disk (for many-trial tests)."""
    return Run(RunInfo(name, name, None), environment or ENVIRONMENT, {case.key: case for case in cases})
