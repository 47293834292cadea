"""The result record of one case, and the run directory that stores them durably.

A run directory holds ``run.json`` (the scenario, the environment, when it started) and one
``results/<case key>.json`` per finished case, each written atomically (temporary file, fsync,
rename), so that a crash or ``kill -9`` of the runner never leaves a truncated or half-written
record. ``--resume`` skips every key that already has a record.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter

SCHEMA_VERSION = 1
Status = Literal["ok", "oom", "host_oom", "timeout", "unsupported", "error", "drift_fail"]
FAILED_STATUSES = ("oom", "host_oom", "timeout", "error")


@dataclass
class Metric:
    """One measured number with the method that produced it; ``value`` None means not measured, and ``reason`` says why."""

    value: float | None
    method: str
    reason: str | None = None

    @classmethod
    def missing(cls, method: str, reason: str) -> Metric:
        return cls(None, method, reason)


@dataclass
class PhaseMemory:
    """Peak memory over one phase of a case (``load`` or ``inference``), in GiB."""

    gpu_allocated_peak_gib: Metric
    gpu_reserved_peak_gib: Metric
    gpu_device_peak_gib: Metric
    host_rss_peak_gib: Metric
    host_anon_peak_gib: Metric
    host_file_peak_gib: Metric
    host_pinned_peak_gib: Metric


@dataclass
class Latency:
    """Raw latency samples in seconds; every stage list has one value per timed image."""

    method: str
    load_s: float | None = None
    warmup_s: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    steps: list[list[float]] = field(default_factory=list)


@dataclass
class ImageOutput:
    """One generated image of a case: which prompt (index into the case's prompts) and seed made it."""

    prompt: int
    seed: int
    image: str
    latents: str | None = None


@dataclass
class Drift:
    """Differences between a case's images and its bf16 baseline's (same prompt, seed and geometry)."""

    baseline_key: str | None
    label: str
    metrics: dict[str, Metric] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)


@dataclass
class CaseResult:
    key: str
    block: str
    label: str
    case: dict[str, Any]
    status: Status
    reason: str | None = None
    weights: str = "synthetic"
    memory: dict[str, PhaseMemory] = field(default_factory=dict)
    latency: Latency | None = None
    setup: dict[str, Any] = field(default_factory=dict)
    outputs: list[ImageOutput] = field(default_factory=list)
    drift: Drift | None = None
    timeline: str | None = None
    log: str | None = None
    error: str | None = None
    started_at: str | None = None
    wall_s: float | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CaseResult:
        return _CASE_RESULT.validate_json(text)

    # Derived figures: the record keeps raw samples only, these summarise them.
    def stage_median(self, stage: str) -> float | None:
        samples = (self.latency.stages.get(stage) if self.latency else None) or []
        return statistics.median(samples) if samples else None

    @property
    def step_samples(self) -> list[float]:
        return [s for image in (self.latency.steps if self.latency else []) for s in image]

    @property
    def s_per_step(self) -> float | None:
        samples = self.step_samples
        return statistics.median(samples) if samples else None

    @property
    def s_per_image(self) -> float | None:
        return self.stage_median("image")

    def peak(self, metric: str, phase: str = "inference") -> float | None:
        memory = self.memory.get(phase)
        return getattr(memory, metric).value if memory else None


_CASE_RESULT = TypeAdapter(CaseResult)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class RunStore:
    """A run directory: ``run.json`` plus one durable record per finished case."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    def subdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @classmethod
    def create(cls, root: str | Path, meta: dict[str, Any]) -> RunStore:
        store = cls(root)
        store.results_dir.mkdir(parents=True, exist_ok=False)
        store.update_meta(meta)
        return store

    @classmethod
    def open(cls, root: str | Path) -> RunStore:
        store = cls(root)
        if not (store.root / "run.json").is_file():
            raise FileNotFoundError(f"{store.root} is not a flux2bench run directory (no run.json)")
        store.results_dir.mkdir(exist_ok=True)
        return store

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.root / "run.json").read_text())

    def update_meta(self, meta: dict[str, Any]) -> None:
        write_atomic(self.root / "run.json", json.dumps(meta, indent=1, sort_keys=True, default=str))

    def write(self, result: CaseResult) -> Path:
        path = self.results_dir / f"{result.key}.json"
        write_atomic(path, result.to_json())
        return path

    def completed_keys(self) -> set[str]:
        return {p.stem for p in self.results_dir.glob("*.json")}

    def results(self) -> list[CaseResult]:
        """All records, in the order the scenario listed the cases (the order of run.json's case keys)."""
        records = {p.stem: CaseResult.from_json(p.read_text()) for p in sorted(self.results_dir.glob("*.json"))}
        order = {key: i for i, key in enumerate(self.meta.get("case_keys", []))}
        return sorted(records.values(), key=lambda r: (order.get(r.key, len(order)), r.key))
