"""The registered axes, in the order their hooks run, and the operations over all of them.

To add an axis: write ``flux2bench/axes/<name>.py`` with an ``Axis`` subclass (and the mixins of ``base`` it needs)
and its ``AXIS`` instance, and add it to ``AXES`` below. The scenario schema, case keys and labels, the worker, the
drift baseline and the report pick it up from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flux2bench.axes import (attention, attention_fp8, batch, cache, checkpoint, compile, compile_cache,
                             fused_projections, gpu, inductor_flags, offload, parallel, precision, ram_cap,
                             text_encoder, vram_cap)
from flux2bench.axes.base import (ArtifactPlaces, Axis, ChoosesDriftBaseline, LoadPlan, LoadsPipeline, MakesArtifact, Option,
                                  PlacesWorker)

if TYPE_CHECKING:
    from flux2bench.case import Case

# The order of labels and of ``apply`` calls: the order a user writes the calls (quantized loading, fused
# projections, offload, the attention backend and its precision, context parallelism, a step cache, the batch, and
# torch.compile last, over all of them, after its flags and its cache). ``before_load`` hooks all run before loading
# and ``plan_load`` does not depend on the order. The on-disk checkpoint comes first: its artifact (the checkpoint
# folder) is what the text encoder's is made from.
AXES: tuple[Axis[Any], ...] = (checkpoint.AXIS, precision.AXIS, text_encoder.AXIS, vram_cap.AXIS, ram_cap.AXIS,
                               fused_projections.AXIS, offload.AXIS, attention.AXIS, attention_fp8.AXIS, parallel.AXIS,
                               cache.AXIS, batch.AXIS, inductor_flags.AXIS, compile_cache.AXIS, compile.AXIS,
                               gpu.AXIS)

Role = TypeVar("Role")


def having(role: type[Role]) -> list[Role]:
    """The axes that take the mixin ``role`` (``LoadsPipeline``, ``MakesArtifact``, ...), in ``AXES`` order."""
    return [axis for axis in AXES if isinstance(axis, role)]


def options() -> list[Option]:
    return [option for axis in AXES for option in axis.options]


def defaults() -> dict[str, Any]:
    return {option.name: option.default for option in options()}


def normalise(values: dict[str, Any]) -> None:
    for axis in AXES:
        axis.normalise(values)


def refusal(case: Case) -> tuple[str, str] | None:
    """The first axis's (option, why) for a case no scenario may ask for, or None."""
    return next((refused for axis in AXES if (refused := axis.refusal(case))), None)


def label_words(case: Case) -> tuple[list[str], list[str]]:
    """Every axis's words of the case's label: (shown before the workload, shown after it)."""
    heads: list[str] = []
    tails: list[str] = []
    for axis in AXES:
        head, tail = axis.label(case)
        heads += head
        tails += tail
    return heads, tails


def _axis(axis: object) -> Axis[Any]:
    assert isinstance(axis, Axis), axis  # an axis met through one of its mixins
    return axis


def name_of(axis: object) -> str:
    return _axis(axis).name


def setup_key(axis: object) -> str:
    """The key of an axis's entry in the record's setup."""
    return _axis(axis).setup_key or name_of(axis)


# --- the worker's hooks -------------------------------------------------------------------------------------------

def plan_load(case: Case, plan: LoadPlan) -> LoadPlan:
    for axis in having(LoadsPipeline):
        axis.plan_load(case, plan)
    return plan


def check(case: Case, plan: LoadPlan) -> None:
    for axis in having(LoadsPipeline):
        axis.check(case, plan)


def artifacts(case: Case, places: ArtifactPlaces) -> list[tuple[str, Path]]:
    """The files the case needs made first, each with the name of the axis that makes it, in ``AXES`` order."""
    return [(name_of(axis), path) for axis in having(MakesArtifact) if (path := axis.artifact(case, places))]


def artifact_maker(name: str) -> MakesArtifact:
    """The axis ``name``, which makes an artifact before its cases run."""
    (maker,) = [axis for axis in having(MakesArtifact) if name_of(axis) == name]
    return maker


# --- what the worker needs from the machine ----------------------------------------------------------------------

def ram_limit_bytes(case: Case) -> int | None:
    limits = [limit for axis in having(PlacesWorker) if (limit := axis.ram_limit_bytes(case)) is not None]
    return min(limits, default=None)


def gpus(case: Case) -> int:
    return max((axis.gpus(case) for axis in having(PlacesWorker)), default=1)


def host_bound(case: Case) -> bool:
    return any(axis.host_bound(case) for axis in having(PlacesWorker))


# --- the drift baseline ------------------------------------------------------------------------------------------

def drift_baseline_values() -> dict[str, Any]:
    """Option values every drift baseline has."""
    return {name: value for axis in having(ChoosesDriftBaseline) for name, value in axis.drift_baseline_values.items()}


def plain_setup_values() -> dict[str, Any]:
    """Option values of the plain setup: a drift baseline with these needs no drift of its own."""
    return drift_baseline_values() | {name: value for axis in having(ChoosesDriftBaseline)
                                      for name, value in axis.plain_setup_values.items()}


def drift_baseline_attempts() -> list[dict[str, Any]]:
    """The option values of the drift baseline the runner runs: the plain setup, then each fallback in turn."""
    plain = plain_setup_values()
    return [plain] + [plain | fallback for axis in having(ChoosesDriftBaseline)
                      for fallback in axis.drift_baseline_fallbacks]


def own_drift_baseline(case: Case) -> dict[str, Any]:
    """Option values that turn a case into its own drift baseline, where an axis wants its effect alone measured
    (a batched case against batch 1 of the same setup); empty: the case is compared with the bf16 drift baseline."""
    return {name: value for axis in having(ChoosesDriftBaseline)
            for name, value in (axis.own_drift_baseline(case) or {}).items()}


def drift_baseline_identity(case: Case) -> tuple[Any, ...]:
    return tuple(part for axis in having(ChoosesDriftBaseline) for part in axis.drift_baseline_identity(case))


def drift_baseline_rank(case: Case) -> tuple[int, ...]:
    return tuple(axis.drift_baseline_rank(case) for axis in having(ChoosesDriftBaseline))
