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
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from flux2bench.case import Case

SCHEMA_VERSION = 1


class Status(StrEnum):
    """How a case ended. ``oom`` and ``unsupported`` are results (the setup does not fit or cannot run here)."""

    OK = "ok"
    OOM = "oom"
    HOST_OOM = "host_oom"
    TIMEOUT = "timeout"
    UNSUPPORTED = "unsupported"
    ERROR = "error"
    DRIFT_FAIL = "drift_fail"

    @property
    def ran(self) -> bool:
        """Whether the case ran to the end, so that its measurements describe a working setup."""
        return self in (Status.OK, Status.DRIFT_FAIL)


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
class RunnerSlot:
    """Where the runner ran the worker: its ``CUDA_VISIBLE_DEVICES``, how many cases ran at a time, its OpenMP threads."""

    cuda_visible_devices: str | None
    concurrent_slots: int = 1
    omp_num_threads: str | None = None


@dataclass
class Setup:
    """What really ran: the device, and what each axis applied (by the axis's setup key, e.g. ``offload``)."""

    device: str | None = None
    gpu: str | None = None
    runner: RunnerSlot | None = None
    worker_exit: str | None = None  # set when the worker finished its measurement but hung on exit
    axes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The flat form records store: the fields above with each axis's entry beside them."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "axes"}
        data["runner"] = asdict(self.runner) if self.runner else None
        return {**self.axes, **{name: value for name, value in data.items() if value is not None}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Setup:
        names = {f.name for f in fields(cls)} - {"axes"}
        known = {name: value for name, value in data.items() if name in names}
        if known.get("runner") is not None:
            known["runner"] = RunnerSlot(**known["runner"])
        return cls(**known, axes={name: value for name, value in data.items() if name not in names})


@dataclass
class CaseResult:
    key: str
    block: str
    label: str
    case: Case
    status: Status
    reason: str | None = None
    weights: str = "synthetic"
    memory: dict[str, PhaseMemory] = field(default_factory=dict)
    latency: Latency | None = None
    setup: Setup = field(default_factory=Setup)
    outputs: list[ImageOutput] = field(default_factory=list)
    drift: Drift | None = None
    timeline: str | None = None
    log: str | None = None
    error: str | None = None
    started_at: str | None = None
    wall_s: float | None = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def for_case(cls, case: Case, status: Status, **fields_: Any) -> CaseResult:
        return cls(key=case.key, block=case.block, label=case.label, case=case, status=status, weights=case.weights,
                   **fields_)

    def to_json(self) -> str:
        data = asdict(self)
        data |= {"case": self.case.to_dict(), "setup": self.setup.to_dict()}
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CaseResult:
        """Parse a record; raises ValueError when it is not a valid record."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a record is a JSON object")
        try:
            typed = {"case": Case.from_dict(data.pop("case")), "setup": Setup.from_dict(data.pop("setup", {}))}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid case or setup: {exc!r}") from None
        return _CASE_RESULT.validate_python({**data, **typed})

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
