"""The profile of a case, as its record stores it: what holds the memory peak and where a denoising step goes.

Every number is validated where it is made and where it is read back (``CaseResult.from_json``): finite,
non-negative, and the parts of a whole add up to it. A part that cannot be measured is absent with the reason of
its whole (``memory_reason``, ``step_reason``, ...), never a guessed number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

PARTS_TOLERANCE = 1e-6  # relative: parts are computed to add up exactly; this absorbs float rounding only

PartKind = Literal["weights", "allocated", "slack", "reserved_later", "outside", "not_attributed"]
Group = Literal["matmul", "attention", "quantize", "elementwise", "copy", "communication", "other", "idle"]


def _check_number(name: str, value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a finite, non-negative number, not {value!r}")


def _check_sum(what: str, parts: list[float], total: float) -> None:
    if abs(sum(parts) - total) > PARTS_TOLERANCE * max(1.0, abs(total)):
        raise ValueError(f"{what}: the parts add up to {sum(parts)!r}, not to their total {total!r}")


def _check_path(name: str | None) -> None:
    if name is not None and (name.startswith("/") or ".." in name.split("/") or "\\" in name):
        raise ValueError(f"a profile names a file outside its run directory: {name!r}")


@dataclass
class MemoryPart:
    """One owner of device memory at the allocator's peak, in GiB, with the method that found it."""

    name: str  # e.g. "weights: transformer float8_e4m3fn (quantized)", "activations and temporaries"
    kind: PartKind
    gib: float
    method: str

    def __post_init__(self) -> None:
        _check_number(f"memory part {self.name!r}", self.gib)


@dataclass
class Allocation:
    """Live allocations at the allocator's peak made by one piece of code (grouped by their frames)."""

    gib: float
    count: int
    made_by: str  # the innermost frame in a library that matters (diffusers, transformers, torch.nn.functional ...)
    component: str | None = None  # transformer, text_encoder, vae, where the frames tell
    module: str | None = None  # e.g. transformer.transformer_blocks.3.attn, where the profile could name it
    weights: bool = False  # blocks allocated during the call that hold weights (moved onto the GPU by offload)

    def __post_init__(self) -> None:
        _check_number("allocation size", self.gib)
        if self.count < 1:
            raise ValueError(f"an allocation group holds at least one allocation, not {self.count}")


@dataclass
class PeakMemory:
    """What holds the device peak of one extra pipeline call (the inference phase's, taken again on its own).

    ``parts`` add up to ``total_gib``: the device-level peak where NVML measured it, else the allocator's reserved
    peak. The allocator's own counters (``allocated_peak_gib``, ``reserved_peak_gib``) and the replay of its
    recorded history (``replayed_allocated_peak_gib``) check one another."""

    total_gib: float
    total_basis: str
    allocated_peak_gib: float
    reserved_peak_gib: float
    replayed_allocated_peak_gib: float
    replayed_reserved_gib: float  # reserved at the moment of the replayed allocated peak
    device_peak_gib: float | None
    parts: list[MemoryPart]
    top: list[Allocation] = field(default_factory=list)
    snapshot: str | None = None  # the allocator snapshot (pickle that pytorch.org/memory_viz opens), relative path
    snapshot_reason: str | None = None
    module_reason: str | None = None  # why allocations name no module, where they do not
    method: str = ""

    def __post_init__(self) -> None:
        for name in ("total_gib", "allocated_peak_gib", "reserved_peak_gib", "replayed_allocated_peak_gib",
                     "replayed_reserved_gib", "device_peak_gib"):
            _check_number(name, getattr(self, name))
        _check_sum("the memory parts", [p.gib for p in self.parts], self.total_gib)
        _check_path(self.snapshot)


@dataclass
class LoadMemory:
    """The load phase, which is timed and therefore not recorded: the weights resident on the GPU when the profile
    starts, per component and dtype, against the load phase's own peaks from the record; the allocator's load peak
    beyond those weights is transient (quantization temporaries, copies)."""

    weights: list[MemoryPart]
    weights_gib: float
    allocated_peak_gib: float | None
    transient_gib: float | None
    method: str

    def __post_init__(self) -> None:
        for name in ("weights_gib", "allocated_peak_gib", "transient_gib"):
            _check_number(name, getattr(self, name))
        _check_sum("the resident weights", [p.gib for p in self.weights], self.weights_gib)


@dataclass
class StepCategory:
    """One category of a profiled denoising step. ``ms`` is its exclusive share of the step (an instant when several
    categories run at once counts for the first in table order), so that the categories and idle add up to the step;
    ``busy_ms`` is the union of its own intervals, overlap included."""

    name: str  # e.g. "matmul bf16", "attention flash", "copy HtoD", "idle"
    group: Group
    ms: float
    busy_ms: float
    items: int  # kernels (or CPU ops on the CPU) in the step
    bytes: float | None = None  # copies: bytes moved in the step
    gib_per_s: float | None = None  # copies: bytes over busy time

    def __post_init__(self) -> None:
        for name in ("ms", "busy_ms", "bytes", "gib_per_s"):
            _check_number(f"{self.name} {name}", getattr(self, name))
        if self.items < 0:
            raise ValueError(f"{self.name}: the count of kernels {self.items} is negative")
        if self.ms > self.busy_ms * (1 + PARTS_TOLERANCE) + 1e-9:
            raise ValueError(f"{self.name}: exclusive time {self.ms} exceeds its busy time {self.busy_ms}")


@dataclass
class Rate:
    """Achieved TFLOP/s of the matrix products (or attention) of a step: their FLOPs over the group's busy time (the
    union of its kernels' intervals), against the card's dense peak for the format they multiply in."""

    group: Literal["matmul", "attention"]
    tflop: float  # FLOPs of the step on this GPU, in 10^12
    busy_ms: float
    tflops: float
    peak_tflops: float | None
    peak_reason: str | None = None

    def __post_init__(self) -> None:
        for name in ("tflop", "busy_ms", "tflops", "peak_tflops"):
            _check_number(f"{self.group} {name}", getattr(self, name))
        if self.busy_ms <= 0 or abs(self.tflops - self.tflop / (self.busy_ms / 1e3)) > PARTS_TOLERANCE * self.tflops:
            raise ValueError(f"{self.group}: {self.tflops!r} TFLOP/s is not its {self.tflop!r} TFLOP over its busy "
                             f"{self.busy_ms!r} ms")


@dataclass
class StepTime:
    """Where one profiled denoising step goes, from a PyTorch profiler trace of an extra call."""

    activity: Literal["cuda", "cpu"]  # GPU kernels and copies, or (no CUDA) the CPU's aten operators
    step_index: int  # 0-based index of the profiled step in its call
    step_ms: float
    categories: list[StepCategory]  # the last is "idle"
    timed_step_ms: float | None  # the median of the case's timed steps, measured without the profiler
    rates: list[Rate] = field(default_factory=list)
    flops_method: str | None = None
    flops_reason: str | None = None  # why matmul and attention have no TFLOP/s, where they do not
    trace: str | None = None  # gzip-compressed Chrome trace (opens in ui.perfetto.dev), relative path
    trace_reason: str | None = None
    method: str = ""

    def __post_init__(self) -> None:
        for name in ("step_ms", "timed_step_ms"):
            _check_number(name, getattr(self, name))
        if self.step_index < 0:
            raise ValueError(f"step_index {self.step_index} is negative")
        _check_sum("the step's categories", [c.ms for c in self.categories], self.step_ms)
        _check_path(self.trace)

    def group_ms(self, group: Group) -> float:
        return sum(c.ms for c in self.categories if c.group == group)


@dataclass
class Profile:
    """The profile of a case: extra calls made after the timed ones and after the inference phase's memory tracker
    closed, so that no timed number and no recorded peak includes them. A part that could not be taken has None and
    its reason; the case's status does not depend on it."""

    method: str
    memory: PeakMemory | None = None
    memory_reason: str | None = None
    load: LoadMemory | None = None
    load_reason: str | None = None
    step: StepTime | None = None
    step_reason: str | None = None

    def __post_init__(self) -> None:
        for part, reason in (("memory", self.memory_reason), ("load", self.load_reason), ("step", self.step_reason)):
            if (getattr(self, part) is None) == (reason is None):
                raise ValueError(f"a profile's {part} is either measured or has a reason, not both or neither")

    def files(self) -> list[str]:
        """The files the profile names, relative to its run directory."""
        return [name for name in (self.memory.snapshot if self.memory else None,
                                  self.step.trace if self.step else None) if name is not None]
