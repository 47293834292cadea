"""The registered axes, in the order their hooks run, and the operations over all of them.

To add an axis: write ``flux2bench/axes/<name>.py`` with an ``Axis`` subclass and its ``AXIS`` instance, and add
it to ``AXES`` below. The scenario schema, case keys and labels, the worker, the drift baseline and the report
pick it up from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flux2bench.axes import (attention, batch, cache, checkpoint, compile, gpu, offload, parallel, precision,
                             ram_cap, text_encoder, vram_cap)
from flux2bench.axes.base import Axis, LoadPlan, Option

if TYPE_CHECKING:
    from flux2bench.case import Case

# The order of labels and of ``apply`` calls: the order a user writes the calls (quantized loading, offload, the
# attention backend, context parallelism, a step cache, the batch, and torch.compile last, over all of them).
# ``before_load`` hooks all run before loading and ``plan_load`` does not depend on the order.
# The on-disk checkpoint comes first: its artifact (the checkpoint folder) is what the text encoder's is made from.
AXES: tuple[Axis[Any], ...] = (checkpoint.AXIS, precision.AXIS, text_encoder.AXIS, vram_cap.AXIS, ram_cap.AXIS,
                               offload.AXIS, attention.AXIS, parallel.AXIS, cache.AXIS, batch.AXIS, compile.AXIS,
                               gpu.AXIS)


def options() -> list[Option]:
    return [option for axis in AXES for option in axis.options]


def defaults() -> dict[str, Any]:
    return {option.name: option.default for option in options()}


def normalise(values: dict[str, Any]) -> None:
    for axis in AXES:
        axis.normalise(values)


def plan_load(case: Case, plan: LoadPlan) -> LoadPlan:
    for axis in AXES:
        axis.plan_load(case, plan)
    return plan


def check(case: Case, plan: LoadPlan) -> None:
    for axis in AXES:
        axis.check(case, plan)


def refusal(case: Case) -> tuple[str, str] | None:
    """The first axis's (option, why) for a case no scenario may ask for, or None."""
    return next((refused for axis in AXES if (refused := axis.refusal(case))), None)


def setup_key(axis: Axis[Any]) -> str:
    return axis.setup_key or axis.name


def baseline_values() -> dict[str, Any]:
    """Option values every drift baseline has."""
    return {name: value for axis in AXES for name, value in axis.baseline.items()}


def reference_values() -> dict[str, Any]:
    """Option values of the plain setup: a baseline with these needs no drift of its own."""
    return baseline_values() | {name: value for axis in AXES for name, value in axis.reference.items()}


def baseline_attempts() -> list[dict[str, Any]]:
    """The option values of the baseline the runner runs: the plain setup, then each fallback in turn."""
    reference = reference_values()
    return [reference] + [reference | fallback for axis in AXES for fallback in axis.baseline_fallbacks]


def drift_reference(case: Case) -> dict[str, Any]:
    """Option values that turn a case into its own drift baseline, where an axis wants its effect alone measured
    (a batched case against batch 1 of the same setup); empty: the case is compared with the bf16 baseline."""
    return {name: value for axis in AXES for name, value in (axis.drift_reference(case) or {}).items()}


def ram_limit_bytes(case: Case) -> int | None:
    limits = [limit for axis in AXES if (limit := axis.ram_limit_bytes(case)) is not None]
    return min(limits, default=None)


def gpus(case: Case) -> int:
    return max(axis.gpus(case) for axis in AXES)


def host_bound(case: Case) -> bool:
    return any(axis.host_bound(case) for axis in AXES)


def baseline_identity(case: Case) -> tuple[Any, ...]:
    return tuple(part for axis in AXES for part in axis.baseline_identity(case))


def baseline_rank(case: Case) -> tuple[int, ...]:
    return tuple(axis.baseline_rank(case) for axis in AXES)
