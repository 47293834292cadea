"""Which bf16 case a case's drift is measured against (or, for a batched case, which batch-1 case).

A baseline shares the case's model, weights and workload, and has every axis at its baseline value (bf16, sdpa,
uncapped, ...; the axes declare them); where several finished baselines exist, the one the axes rank lightest
(no offload before model offload, ...) is taken.
"""

from __future__ import annotations

from typing import Any

from flux2bench.axes import registry
from flux2bench.case import Case
from flux2bench.results import CaseResult

IDENTITY_FIELDS = ("model", "weights", "source", "prompts", "seeds", "width", "height", "reference_images",
                   "reference_image_size", "steps", "guidance_scale")


def baseline_identity(case: Case) -> tuple:
    """What a case and its baseline must share: the same model, weights and workload, and what the axes name
    (the GPU kind)."""
    return tuple(getattr(case, name) for name in IDENTITY_FIELDS) + registry.baseline_identity(case)


def _has(case: Case, values: dict[str, Any]) -> bool:
    return all(case.settings[name] == value for name, value in values.items())


def is_baseline(case: Case) -> bool:
    """Every axis at its baseline value; options the axes leave free may take any value."""
    return _has(case, registry.baseline_values())


def is_attempt(case: Case, attempt: dict[str, Any]) -> bool:
    """Whether ``case`` is the baseline the runner runs with ``attempt``'s values (see registry.baseline_attempts)."""
    return _has(case, attempt)


def needs_drift(case: Case) -> bool:
    """Every case but the plain bf16 setup itself is compared with a baseline."""
    return not _has(case, registry.reference_values())


def baseline_case(case: Case, attempt: dict[str, Any], block: str) -> Case:
    """The case's own baseline with ``attempt``'s option values, for the runner to run when none exists."""
    return case.replace(**attempt, block=block)


def own_baseline(case: Case) -> Case | None:
    """The case's own baseline where an axis measures its effect alone (a batched case: the same setup at batch
    1), else None (the bf16 baseline). Its block is the case's: blocks are compared by ``same_setup``."""
    changes = registry.drift_reference(case)
    return case.replace(**changes) if changes else None


def same_setup(case: Case, other: Case) -> bool:
    """Whether two cases measure the same thing, whatever their blocks."""
    return case.replace(block="").key == other.replace(block="").key


def serves_as(case: Case, own: Case) -> bool:
    """Whether ``case`` can stand for the own baseline ``own``: the same setup, with an image of each of its seeds
    (and perhaps more)."""
    return set(own.seeds) <= set(case.seeds) and same_setup(case.replace(seeds=own.seeds), own)


def pick_baseline(case: Case, candidates: list[CaseResult]) -> CaseResult | None:
    """A batched case's finished own baseline (one with an image of every seed of its batches), else a finished
    bf16 baseline of the same identity, the lightest the axes rank first."""
    if (own := own_baseline(case)) is not None:  # the same setup's key holds what the axes name (the GPU kind)
        return next((r for r in candidates if r.status.ran and serves_as(r.case, own)), None)
    identity = baseline_identity(case)
    matching = [r for r in candidates
                if r.status == "ok" and r.key != case.key and is_baseline(r.case) and baseline_identity(r.case) == identity]
    return min(matching, key=lambda r: registry.baseline_rank(r.case), default=None)
