"""What an axis is: the scenario fields it owns, its support check, its part in loading, and how it is applied.

An axis is one way a setup can vary (precision, offload, attention, ...). Everything the harness knows about
it lives in its own module under ``flux2bench/axes/``; the scenario schema, case keys and labels, the worker,
the drift baseline and the report read axes through this interface only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from flux2bench.models import COMPONENTS

Case = Any  # a flux2bench.case.Case (which is built from the axes, so it cannot be imported here)


@dataclass(frozen=True)
class Option:
    """One scenario field owned by an axis.

    ``annotation`` is the pydantic type of one value; an ``expands`` option may be given a list in a scenario,
    and each value becomes a case of its own. Options added after the first release set ``keyed_when_default``
    False: their default value stays out of the case key, so that the keys of earlier runs (which CI gates
    keep as baselines) do not change.
    """

    name: str
    annotation: Any
    default: Any
    expands: bool = True
    keyed_when_default: bool = True
    description: str = ""


@dataclass
class LoadPlan:
    """How a case's pipeline is loaded: which components, in which precision, created where.

    Axes refine a plan in ``plan_load``; ``placement`` is where each component's weights are created.
    """

    device: torch.device
    home: torch.device  # where weights are created when they are not created on ``device`` (offload: the CPU)
    precisions: dict[str, str] = field(default_factory=lambda: {name: "bf16" for name in COMPONENTS})
    skip: set[str] = field(default_factory=set)
    # Components quantized on ``device`` while loading: while one of them is held, every component is created there.
    quantized_on_device: set[str] = field(default_factory=set)
    options: dict[str, Any] = field(default_factory=dict)  # extra ``from_pretrained`` keyword arguments

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(name for name in COMPONENTS if name not in self.skip)

    @property
    def placement(self) -> dict[str, torch.device]:
        target = self.device if self.quantized_on_device & set(self.components) else self.home
        return {name: target for name in self.components}

    def held_precisions(self) -> set[str]:
        return {self.precisions[name] for name in self.components if name in self.precisions}


class Axis:
    """Base class of the axes: every hook is optional and does nothing unless overridden."""

    name: str = ""
    options: tuple[Option, ...] = ()
    setup_key: str = ""  # the key of what ``before_load`` / ``apply`` return in the record's setup (default: name)
    # Option values every bf16 drift baseline has; options not named may take any value in a baseline.
    baseline: dict[str, Any] = {}
    # Further values of the plain setup the runner runs as a baseline when none exists.
    reference: dict[str, Any] = {}
    # Values the runner tries, in order, where the plain baseline ran out of memory or cannot run.
    baseline_fallbacks: tuple[dict[str, Any], ...] = ()

    def normalise(self, values: dict[str, Any]) -> None:
        """Fill derived values in one combination of a block's values (e.g. a default taken from another option)."""

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        """Words of the case's label: (shown before the workload, shown after it)."""
        return [], []

    def artifact(self, case: Case, run_dir: Path) -> Path | None:
        """A file that a separate worker process must make before the case runs (shared by equal cases), or None."""
        return None

    def make_artifact(self, case: Case, run_dir: Path, device: torch.device,
                      load_pipeline: Callable[[Case, LoadPlan], Any], progress: Callable[[str], None]) -> Path | None:
        """Make the file ``artifact`` names, loading what it needs with ``load_pipeline`` and telling ``progress``
        how far it is; runs in its own worker process, one at a time per file."""
        return None

    def plan_load(self, case: Case, plan: LoadPlan) -> None:
        """Refine how the pipeline is loaded."""

    def check(self, case: Case, plan: LoadPlan) -> None:
        """Raise ``Unsupported`` with the reason when the case cannot run here; called before anything loads."""

    def before_load(self, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        """Settings applied to the process before loading; returns what was set, for the record."""
        return None

    def apply(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        """Apply the axis to the loaded pipeline; returns what was really applied, for the record."""
        return None

    def after_inference(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        """What only the measured calls reveal (e.g. whether compilation hit its cache); merged into the record's
        entry of this axis."""
        return None

    def drift_reference(self, case: Case) -> dict[str, Any] | None:
        """Option values that make this case's drift baseline the same setup with them changed, so that the drift
        shows this axis's effect alone; None: the bf16 baseline."""
        return None

    def ram_limit_bytes(self, case: Case) -> int | None:
        """Host RAM the case's worker may use (the runner enforces it with a cgroup), or None for no limit."""
        return None

    def gpus(self, case: Case) -> int:
        """How many GPUs (one worker process each) the case runs on."""
        return 1

    def host_bound(self, case: Case) -> bool:
        """Whether the case's timings depend on the host (CPU, RAM, PCIe) as much as on the GPU."""
        return False

    def baseline_rank(self, case: Case) -> int:
        """Among several baselines of one case, the lowest rank is preferred."""
        return 0
