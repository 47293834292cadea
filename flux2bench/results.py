"""The result record of one case: what ran, how it ended, and every number measured, each with its method.

Records are serialised one way (``CaseResult.to_json`` / ``from_json``); ``flux2bench.store`` keeps them in the
run directory.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import Any, Iterable

from pydantic import TypeAdapter, ValidationError

from flux2bench.axes import batch
from flux2bench.case import Case
from flux2bench.profiling.record import Profile
from flux2bench.record_checks import first_problem, read_case, record_problems

SCHEMA_VERSION = 1
# The timed stages of one image, in the order they run; ``Latency.stages`` also holds "image", the whole call.
STAGES = ("text_encoding", "reference_encoding", "denoise", "vae_decode")
IMAGE = "image"


class Status(StrEnum):
    """How a case ended. ``oom`` and ``unsupported`` are results (the setup does not fit or cannot run here)."""

    OK = "ok"
    OOM = "oom"
    HOST_OOM = "host_oom"
    TIMEOUT = "timeout"
    UNSUPPORTED = "unsupported"
    ERROR = "error"
    KILLED = "killed"  # ended by a signal from outside, with no evidence of the kernel's OOM killer
    DRIFT_FAIL = "drift_fail"

    @property
    def ran(self) -> bool:
        """Whether the case ran to the end, so that its measurements describe a working setup."""
        return self in (Status.OK, Status.DRIFT_FAIL)

    @property
    def failed(self) -> bool:
        """Whether the harness or the setup broke (a result to fix or rerun), as opposed to a measured outcome:
        ``ok``, ``oom``, ``host_oom`` (the setup does not fit) and ``unsupported`` are results."""
        return self in (Status.ERROR, Status.TIMEOUT, Status.KILLED, Status.DRIFT_FAIL)


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
    """Peak memory over one phase of a case (``load`` or ``inference``), in GiB, and what the phase read from disk."""

    gpu_allocated_peak_gib: Metric
    gpu_reserved_peak_gib: Metric
    gpu_device_peak_gib: Metric
    host_rss_peak_gib: Metric
    host_anon_peak_gib: Metric
    host_file_peak_gib: Metric
    host_pinned_peak_gib: Metric
    # Recorded since the on-disk weights: records of earlier versions have none.
    host_shared_peak_gib: Metric = field(default_factory=lambda: _not_recorded("RssShmem"))
    major_faults: Metric = field(default_factory=lambda: _not_recorded("majflt"))
    disk_read_gib: Metric = field(default_factory=lambda: _not_recorded("read_bytes"))


def _not_recorded(what: str) -> Metric:
    return Metric.missing(what, "not recorded by the flux2bench version that made this record")


@dataclass
class Latency:
    """Raw latency samples in seconds; every stage list has one value per timed pipeline call (one image at batch 1,
    ``batch_size`` images otherwise).

    ``first_call_s`` is the first pipeline call (a warm-up, else the first timed image): with ``torch.compile`` it
    holds the compilation. ``time_to_first_image_s`` runs from the worker process's start, before its imports, to
    the end of that call: what a service that scales to zero waits for its first image (a worker forked by the fork
    server counts the server's import time in place of its own). ``compiled_graphs`` has
    one count per timed image: the graphs torch.compile compiled during it (a recompilation, e.g. where a step
    cache's hooks change what a compiled block runs); a count above zero means that image's timings include
    compilation. ``transformer_calls`` has the input shape of each transformer call of the first timed step, read
    by ``flux2bench.flops``.
    """

    method: str
    load_s: float | None = None
    warmup_s: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    steps: list[list[float]] = field(default_factory=list)
    first_call_s: float | None = None
    time_to_first_image_s: float | None = None
    compiled_graphs: list[int] = field(default_factory=list)
    # [batch, image tokens (with reference tokens), text tokens] of each transformer call in the first timed step
    transformer_calls: list[list[int]] = field(default_factory=list)


@dataclass
class Energy:
    """GPU energy of each timed pipeline call (of ``batch_size`` images) in joules; empty with a ``reason`` where it
    cannot be measured."""

    method: str
    per_image_j: list[float] = field(default_factory=list)
    reason: str | None = None


@dataclass
class WallSplit:
    """Where a case's wall time went, in seconds. The worker measures its parts from one monotonic clock (Linux's
    ``CLOCK_MONOTONIC``, shared by every process, so the runner's spawn time is on it too); the runner adds the
    worker's wall from its side (spawn to exit), the walls of the artifact workers it ran for this case, and
    ``other_s``: the worker's wall not in any part (timelines, saving images, writing the record, exit).

    ``compile_s`` is the first warm-up call's time beyond a timed image's median, where the case compiles; the
    rest of the warm-up calls' time is ``warmup_s``. ``timed_s`` sums the timed images' calls."""

    method: str
    # the runner's decision to start the worker to its first line: interpreter start, or the fork (and any wait for the
    # fork server's imports)
    process_start_s: float | None = None
    imports_s: float | None = None  # torch, diffusers and flux2bench's modules
    cuda_init_s: float | None = None  # the CUDA context (0 on the CPU: nothing to initialise)
    load_s: float | None = None  # creating or reading weights, quantizing, moving, applying the axes
    compile_s: float | None = None
    warmup_s: float | None = None
    timed_s: float | None = None
    worker_wall_s: float | None = None  # the runner's: spawn to exit of the case's worker
    other_s: float | None = None
    artifacts_s: float = 0.0  # the runner's: this case's artifact workers (e.g. prompt embeddings), before its own
    # how the worker started: "fork-server" (forked after the run's one import of torch and diffusers, whose wait is
    # in process_start_s) or "fresh" (a new interpreter that imports them itself); None in older records
    worker_start: str | None = None

    PARTS = ("process_start_s", "imports_s", "cuda_init_s", "load_s", "compile_s", "warmup_s", "timed_s", "other_s")

    def held_s(self) -> float | None:
        """Wall time the case held its device slot: its artifact workers and its own worker."""
        return None if self.worker_wall_s is None else self.artifacts_s + self.worker_wall_s


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
    """Where the worker ran: its ``CUDA_VISIBLE_DEVICES``, how many cases ran at a time there, its OpenMP threads,
    and which executor placed it on which host (and Ray node) and kind of GPU (records made before executors
    existed have None there)."""

    cuda_visible_devices: str | None
    concurrent_slots: int = 1
    omp_num_threads: str | None = None
    executor: str | None = None
    host: str | None = None
    node_id: str | None = None
    gpu_kind: str | None = None
    ray_version: str | None = None


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
class RankRecord:
    """One rank's own measurements, for a case split over several GPUs."""

    rank: int
    gpu: str | None
    status: Status
    memory: dict[str, PhaseMemory] = field(default_factory=dict)
    energy: Energy | None = None


def highest_peaks(per_rank: list[dict[str, PhaseMemory]]) -> dict[str, PhaseMemory]:
    """Per phase and metric, the highest value any rank reached: the memory one GPU of the case needs."""
    merged = {}
    for phase in dict.fromkeys(name for memory in per_rank for name in memory):
        phases = [memory[phase] for memory in per_rank if phase in memory]
        merged[phase] = PhaseMemory(**{f.name: _highest([getattr(p, f.name) for p in phases], len(per_rank))
                                       for f in fields(PhaseMemory)})
    return merged


def _highest(metrics: list[Metric], ranks: int) -> Metric:
    measured = [m for m in metrics if m.value is not None]
    if not measured:
        return metrics[0]
    top = max(measured, key=lambda m: m.value)
    return Metric(top.value, f"highest of {ranks} ranks: {top.method}")


def summed_energy(per_rank: list[Energy | None]) -> Energy | None:
    """The energy of each image over every GPU of the case."""
    known = [e for e in per_rank if e is not None]
    if not known or any(not e.per_image_j for e in known) or len(known) < len(per_rank):
        return next((e for e in known if e.reason), known[0] if known else None)
    return Energy(f"sum over {len(known)} GPUs: {known[0].method}",
                  [sum(values) for values in zip(*(e.per_image_j for e in known))])


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
    energy: Energy | None = None
    ranks: list[RankRecord] = field(default_factory=list)  # per GPU, for a case split over several
    setup: Setup = field(default_factory=Setup)
    outputs: list[ImageOutput] = field(default_factory=list)
    drift: Drift | None = None
    timeline: str | None = None
    log: str | None = None
    error: str | None = None
    started_at: str | None = None
    wall_s: float | None = None
    wall_split: WallSplit | None = None
    schema_version: int = SCHEMA_VERSION
    # An unsupported case whose reason is this machine (errors.MachineLacks), not the setup: run again on resume.
    machine_lacks: bool = False
    profile: Profile | None = None  # what holds the peak and where a step goes (scenario field profile: true)

    @classmethod
    def unsupported(cls, case: Case, exc: Exception) -> CaseResult:
        """The record of a case that cannot run (``Unsupported``), marked when the machine is the reason."""
        from flux2bench.errors import MachineLacks

        return cls.for_case(case, Status.UNSUPPORTED, reason=str(exc), machine_lacks=isinstance(exc, MachineLacks))

    @classmethod
    def for_case(cls, case: Case, status: Status, **fields_: Any) -> CaseResult:
        return cls(key=case.key, block=case.block, label=case.label, case=case, status=status, weights=case.weights,
                   **fields_)

    def to_json(self) -> str:
        data = asdict(self)
        data |= {"case": self.case.to_dict(), "setup": self.setup.to_dict()}
        for name, default in (("machine_lacks", False), ("profile", None)):
            if data[name] == default:  # the records of every other case stay as earlier versions wrote them
                del data[name]
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CaseResult:
        """Parse and check a record, as user input: ValueError names the first field that is not what a record holds
        (a wrong type, a number no measurement gives, a case the scenario schema refuses or whose key is not the
        record's, a file outside the run directory)."""
        try:
            return cls._parse(json.loads(text))
        except RecursionError:
            raise ValueError("the record is nested too deeply to be one") from None

    @classmethod
    def _parse(cls, data: Any) -> CaseResult:
        if not isinstance(data, dict):
            raise ValueError("a record is a JSON object")
        case = read_case(data.get("case"))
        setup = data.get("setup", {})
        if not isinstance(setup, dict):
            raise ValueError("setup: a JSON object")
        names = {f.name for f in fields(Setup)} - {"axes"}
        setup = {**{k: v for k, v in setup.items() if k in names}, "axes": {k: v for k, v in setup.items()
                                                                          if k not in names}}
        try:  # strict: a number is a JSON number, a text a string, every field of its type
            result = _CASE_RESULT.validate_json(json.dumps({**data, "case": asdict(case), "setup": setup}),
                                                strict=True)
        except ValidationError as exc:
            raise ValueError(first_problem(exc)) from None
        result.case = case
        if not 1 <= result.schema_version <= SCHEMA_VERSION:
            raise ValueError(f"schema_version: {result.schema_version} is not a record this version of flux2bench "
                             f"reads (1 to {SCHEMA_VERSION})")
        if result.started_at is not None and not _is_iso_time(result.started_at):
            raise ValueError(f"started_at: {result.started_at!r} is not an ISO 8601 time")
        if problems := result.problems():
            raise ValueError(problems[0])
        return result

    def problems(self) -> list[str]:
        """What in the record no measurement gives, ``field: problem`` each: a number that is NaN, infinite,
        negative, or zero where a duration is divided by; a key, block or weights its case does not have; a file
        named outside the run directory. Empty for a record whose numbers can be compared."""
        return record_problems(self)

    def files(self) -> list[str]:
        """The files the record names, relative to its run directory."""
        names = [self.timeline, self.log] + [p for o in self.outputs for p in (o.image, o.latents)]
        names += self.profile.files() if self.profile else []
        return [name for name in names if name is not None]

    # The record keeps raw samples; flux2bench.metrics summarises them (s/step, s/image, ...).
    @property
    def step_samples(self) -> list[float]:
        return [s for image in (self.latency.steps if self.latency else []) for s in image]

    @property
    def batch_size(self) -> int:
        return batch.AXIS.size(self.case)


_CASE_RESULT = TypeAdapter(CaseResult)


def _is_iso_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def measured_on(results: Iterable[CaseResult]) -> Counter:
    """How many cases were measured on each GPU model, from the records: a run resumed on another machine may
    span several, while its run.json names only the machine it was created on."""
    return Counter(r.setup.gpu for r in results if r.setup.gpu)


def describe_gpus(counts: Counter) -> str:
    return ", ".join(f"{gpu} ({count} cases)" for gpu, count in counts.items())
