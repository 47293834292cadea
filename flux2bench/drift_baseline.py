"""Which case a case's drift is measured against: its drift baseline, a bf16 case of the same workload (or, for a
batched case, the batch-1 case of its own setup).

A drift baseline shares the case's model, weights and workload, and has every axis at its drift baseline value
(bf16, sdpa, uncapped, ...; the axes declare them); where several finished drift baselines exist, the one the axes
rank lightest (no offload before model offload, ...) is taken.
"""

from __future__ import annotations

from typing import Any

from flux2bench.axes import registry
from flux2bench.case import Case
from flux2bench.identity import MEASUREMENT_FIELDS, changed, workload
from flux2bench.results import CaseResult


def drift_baseline_identity(case: Case) -> tuple[Any, ...]:
    """What a case and its drift baseline must share: the same model, weights and workload, and what the axes name
    (the GPU kind)."""
    return workload(case) + registry.drift_baseline_identity(case)


def _has(case: Case, values: dict[str, Any]) -> bool:
    return all(case.settings[name] == value for name, value in values.items())


def is_drift_baseline(case: Case) -> bool:
    """Every axis at its drift baseline value; options the axes leave free may take any value."""
    return _has(case, registry.drift_baseline_values())


def is_attempt(case: Case, attempt: dict[str, Any]) -> bool:
    """Whether ``case`` is the drift baseline the runner runs with ``attempt``'s values (see
    ``registry.drift_baseline_attempts``)."""
    return _has(case, attempt)


def needs_drift(case: Case) -> bool:
    """Every case but the plain bf16 setup itself is compared with a drift baseline."""
    return not _has(case, registry.plain_setup_values())


def drift_baseline_case(case: Case, attempt: dict[str, Any], block: str) -> Case:
    """The case's drift baseline with ``attempt``'s option values, for the runner to run when none exists."""
    return changed(case, **attempt, block=block)


def own_drift_baseline(case: Case) -> Case | None:
    """The case's own drift baseline where an axis measures its effect alone (a batched case: the same setup at
    batch 1), else None (the bf16 drift baseline). Its block is the case's: blocks are compared by ``same_setup``."""
    changes = registry.own_drift_baseline(case)
    return changed(case, **changes) if changes else None


def same_setup(case: Case, other: Case) -> bool:
    """Whether two cases measure the same thing, whatever their blocks."""
    return changed(case, block="").key == changed(other, block="").key


def serves_as(case: Case, own: Case) -> bool:
    """Whether ``case`` can stand for the own drift baseline ``own``: the same setup, with an image of each of its
    seeds (and perhaps more), however many warm-ups and timed calls it made (they do not change an image)."""
    measured_alike = {name: getattr(own, name) for name in MEASUREMENT_FIELDS}
    return set(own.seeds) <= set(case.seeds) and same_setup(changed(case, seeds=own.seeds, **measured_alike), own)


def pick_drift_baseline(case: Case, candidates: list[CaseResult]) -> CaseResult | None:
    """A batched case's finished own drift baseline (one with an image of every seed of its batches), else a finished
    bf16 drift baseline of the same identity, the lightest the axes rank first."""
    if (own := own_drift_baseline(case)) is not None:  # the same setup's key holds what the axes name (the GPU kind)
        return next((r for r in candidates if r.status.ran and serves_as(r.case, own)), None)
    identity = drift_baseline_identity(case)
    matching = [r for r in candidates if r.status == "ok" and r.key != case.key and is_drift_baseline(r.case)
                and drift_baseline_identity(r.case) == identity]
    return min(matching, key=lambda r: registry.drift_baseline_rank(r.case), default=None)
