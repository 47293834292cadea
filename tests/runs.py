"""Builders of synthetic run directories and case records, for tests that need runs with known numbers.

``make_case`` makes one CaseResult from plain numbers (a named case, with its real key), ``make_run`` writes a run directory holding
such cases (run.json + results/<key>.json, exactly as the runner does), and ``noisy`` draws
realistic latency samples (log-normal noise with an occasional slow outlier).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from flux2bench.identity import case_from_dict
from flux2bench.compare import Run, RunInfo
from flux2bench.results import CaseResult, Drift, Latency, Metric, Setup, Status

from records import BASE_CASE, ENVIRONMENT, phase, write_run

STEPS = 4
STEP_SHARE = 0.9  # of an image's seconds spent in the denoising steps


def noisy(rng: np.random.Generator, median: float, n: int, cv: float, outlier_p: float = 0.02) -> list[float]:
    """``n`` latency samples around ``median``: log-normal with ``cv``, each slowed 20-60% with probability ``outlier_p``."""
    samples = median * np.exp(rng.normal(0.0, cv, n))
    outliers = rng.random(n) < outlier_p
    samples[outliers] *= rng.uniform(1.2, 1.6, outliers.sum())
    return samples.tolist()


def make_case(name: str, *, block: str | None = None, status: str = "ok", image_s: list[float] | None = None,
              memory: dict[str, float | None] | None = None, drift: dict[str, float] | None = None,
              label: str | None = None, reason: str | None = None, setting: dict[str, Any] | None = None,
              device: str | None = None, gpu: str | None = None, repeats: int | None = None) -> CaseResult:
    """One case record, named ``name`` (its prompt and default label say it; its key is the real key of its case,
    ``<block>-<hash>``, the block being the name's first part). ``image_s``: seconds per timed image (its steps share
    STEP_SHARE of it evenly); ``memory``: inference-phase peaks in GiB by field name; ``drift``: metric name to
    value; ``setting``: axis options of the case; ``device``: the device the worker ran on; ``gpu``: the GPU model it
    was measured on; ``repeats``: the case's timed calls (one prompt, one seed), by default one per ``image_s``."""
    block = block or name.split("-")[0]
    latency = None
    if image_s is not None:
        steps = [[s * STEP_SHARE / STEPS] * STEPS for s in image_s]
        latency = Latency("cuda_event", load_s=10.0, warmup_s=[max(image_s, default=1.0)],
                          stages={"image": list(image_s)}, steps=steps)
    repeats = repeats if repeats is not None else len(image_s) if image_s else 1
    case = case_from_dict({**BASE_CASE, "warmup": 1, "seeds": (0,), "repeats": repeats,
                           **(setting or {}), "block": block, "steps": STEPS, "prompts": (f"a red fox ({name})",)})
    return CaseResult(
        key=case.key, block=block, label=label or f"case {name}", case=case, status=Status(status), reason=reason,
        setup=Setup(device=device, gpu=gpu),
        memory={"inference": phase(**memory)} if memory is not None else {},
        latency=latency,
        drift=Drift("bf16-reference", "bf16", {m: Metric(v, "test") for m, v in drift.items()}) if drift else None,
    )


def with_changes(case: CaseResult, **changes: Any) -> CaseResult:
    """A copy of a case record with some fields replaced."""
    return replace(copy.deepcopy(case), **changes)


def make_run(root: Path, name: str, cases: list[CaseResult], environment: dict[str, Any] | None = None,
             case_keys: list[str] | None = None) -> Path:
    """Write run directory ``root/name`` holding ``cases`` (see ``records.write_run``)."""
    return write_run(root / name, cases, run_id=name, environment=environment, case_keys=case_keys)


def named(cases: list[Any], name: str) -> Any:
    """The case (a record, or a verdict's case report) that ``make_case`` named ``name``: its label says it."""
    return next(case for case in cases if case.label == f"case {name}")


def run_in_memory(name: str, cases: list[CaseResult], environment: dict[str, Any] | None = None) -> Run:
    """The loaded form of ``make_run``'s directory, without touching disk (for many-trial tests)."""
    return Run(RunInfo(name, name, None), environment or ENVIRONMENT, {case.key: case for case in cases})
