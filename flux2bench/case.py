"""One fully specified benchmark case: what a worker process runs. Pure data: its key and label are derived when
the case is made (``flux2bench.identity``), from the axes, which read cases but are not read by them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

# The part each field plays in a case's identity (its ``role`` metadata), from which ``flux2bench.identity`` derives
# the case key, the workload a drift baseline must share and the setup a card answers for:
WORKLOAD = "workload"  # what is computed: a drift baseline shares all of it
MEASUREMENT = "measurement"  # how it is measured (warm-ups, repeats): part of the key, not of the setup
PLACEMENT = "placement"  # where it runs: part of the key and of the setup
BOOKKEEPING = "bookkeeping"  # neither what is computed nor how it is measured: outside the key
OPTIONS = "options"  # the axes' options: which enter the key, and which the setup, the axes' metadata says
# The block of the drift baseline the runner adds for a block B: B.baseline
DRIFT_BASELINE_SUFFIX = ".baseline"


def _role(role: str, **options: Any) -> Any:
    return field(metadata={"role": role}, **options)


@dataclass(frozen=True, kw_only=True)
class Case:
    """The model, the workload and how it is measured, plus ``settings``: the value of every axis option.

    ``key`` (the block name and a hash of everything that defines the measurement) and ``label`` are derived once,
    by ``flux2bench.identity.new_case``; build cases there, not here.
    """

    block: str = _role(BOOKKEEPING)
    model: str = _role(WORKLOAD)
    weights: str = _role(WORKLOAD)
    source: str | None = _role(WORKLOAD)
    reference_images: int = _role(WORKLOAD)
    reference_image_size: tuple[int, int] = _role(WORKLOAD)
    width: int = _role(WORKLOAD)
    height: int = _role(WORKLOAD)
    steps: int = _role(WORKLOAD)
    guidance_scale: float = _role(WORKLOAD)
    seeds: tuple[int, ...] = _role(WORKLOAD)
    prompts: tuple[str, ...] = _role(WORKLOAD)
    repeats: int = _role(MEASUREMENT)
    warmup: int = _role(MEASUREMENT)
    device: str = _role(PLACEMENT)
    timeout_s: float = _role(BOOKKEEPING)
    settings: dict[str, Any] = _role(OPTIONS)
    drift_thresholds: tuple[tuple[str, float], ...] = _role(BOOKKEEPING, default=())
    drift_baseline: str = _role(BOOKKEEPING, default="run")
    profile: bool = _role(BOOKKEEPING, default=False)  # extra profiled calls after the timed ones (flux2bench.profiling)
    key: str = _role(BOOKKEEPING, compare=False)
    label: str = _role(BOOKKEEPING, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON form records store: the case's fields and its axis options side by side (the label is
        derived, so not stored)."""
        data = json.loads(json.dumps(asdict(self)))
        data.pop("label")
        return {**data.pop("settings"), **data}
