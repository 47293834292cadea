"""What an axis is: the scenario fields it owns and its words in a case's label, plus, in small mixins that an axis
takes as it needs them, its part in loading the pipeline, in making artifacts, in placing the worker and in
choosing a drift baseline.

An axis is one way a setup can vary (precision, offload, attention, ...). Everything the harness knows about
it lives in its own module under ``flux2bench/axes/``; the scenario schema, case keys and labels, the worker,
the drift baseline and the report read axes through these classes only (``flux2bench/axes/registry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from flux2bench.models import COMPONENTS

if TYPE_CHECKING:
    import torch

    from flux2bench.case import Case


@dataclass(frozen=True)
class Option:
    """One scenario field owned by an axis, as the scenario schema, case keys and defaults read it.

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
    emulation: bool = False
    description: str = ""


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# Marks on a settings field (``Annotated[bool, ONE_PER_BLOCK]``): a list in a scenario is one value, not one case
# per item; the default value stays out of the case key (an option added after the first release).
ONE_PER_BLOCK = _Marker("ONE_PER_BLOCK")
UNKEYED_AT_DEFAULT = _Marker("UNKEYED_AT_DEFAULT")
EMULATION = _Marker("EMULATION")  # the option emulates a smaller machine (a cap), not another setup


class Settings(BaseModel):
    """An axis's options, typed: one field per option, named as the scenario and the records name it."""

    model_config = ConfigDict(frozen=True, extra="forbid")


S = TypeVar("S", bound=Settings)


def options_of(model: type[Settings]) -> tuple[Option, ...]:
    """The options a settings model declares, with its marks read off and its constraints kept."""
    options = []
    for name, info in model.model_fields.items():
        constraints = [item for item in info.metadata if not isinstance(item, _Marker)]
        annotation = Annotated[(info.annotation, *constraints)] if constraints else info.annotation
        options.append(Option(name, annotation, info.default, expands=ONE_PER_BLOCK not in info.metadata,
                              keyed_when_default=UNKEYED_AT_DEFAULT not in info.metadata,
                              emulation=EMULATION in info.metadata,
                              description=info.description or ""))
    return tuple(options)


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


class Axis(Generic[S]):
    """What every axis has: its options, declared as a pydantic model (``settings_model``, a ``Settings`` subclass
    with one field per option; ``ONE_PER_BLOCK``, ``UNKEYED_AT_DEFAULT`` and ``EMULATION`` in a field's
    ``Annotated`` metadata set ``Option.expands``, ``Option.keyed_when_default`` and ``Option.emulation``), read
    typed through ``self.of(case)``, and its words in a case's label. An axis that depends on another asks that axis
    through one of its methods (e.g. ``offload.AXIS.moves_weights(case)``), never by the other's option names.

    What else an axis does, it takes from the mixins below: ``LoadsPipeline`` (the worker's hooks),
    ``MakesArtifact`` (a file made before the case in a worker of its own), ``PlacesWorker`` (GPUs, RAM limit, host
    dependence) and ``ChoosesDriftBaseline`` (what a bf16 drift baseline has).
    """

    name: str = ""
    settings_model: type[S]
    setup_key: str = ""  # the key of what its hooks return in the record's setup (default: name)
    # What a record read back may hold under that key, where something reads it: None leaves it unchecked
    record_model: type[BaseModel] | None = None

    def __init__(self) -> None:
        self.options = options_of(self.settings_model)

    def of(self, case: Case) -> S:
        """The case's values of this axis's options, typed."""
        return self.settings_model.model_validate({name: case.settings[name]
                                                   for name in self.settings_model.model_fields})

    def normalise(self, values: dict[str, Any]) -> None:
        """Fill derived values in one combination of a block's values (e.g. a default taken from another option)."""

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        """Words of the case's label: (shown before the workload, shown after it)."""
        return [], []

    def refusal(self, case: Case) -> tuple[str, str] | None:
        """(option, why) when no scenario may ask for this case anywhere (a combination of values that cannot be
        run, e.g. a seed that overflows); checked when a scenario is read, before anything is written."""
        return None


class Observation(Protocol):
    """What an axis watches during the measured calls (``LoadsPipeline.observe``), read once they are done."""

    def found(self) -> dict[str, Any] | None:
        """Merged into the record's entry of the axis."""


class LoadsPipeline:
    """An axis that takes part in loading and setting up the pipeline, in the worker. Every hook is optional."""

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

    def observe(self, pipe: Any, case: Case, plan: LoadPlan) -> Observation | None:
        """Start watching what only the measured calls reveal (e.g. whether compilation hit its cache); the
        observation holds the case's state, so that no axis keeps any."""
        return None


@dataclass(frozen=True)
class ArtifactPlaces:
    """Where artifacts live: the run directory, and the folder of on-disk checkpoints that runs share."""

    run_dir: Path
    checkpoints: Path


class MakesArtifact:
    """An axis whose cases need a file made first, in a worker process of its own, shared by equal cases."""

    def artifact(self, case: Case, places: ArtifactPlaces) -> Path | None:
        """The file (or folder) the case needs, or None."""
        return None

    def make_artifact(self, case: Case, places: ArtifactPlaces, device: torch.device,
                      load_pipeline: Callable[[Case, LoadPlan], Any], progress: Callable[[str], None]) -> Path | None:
        """Make the file ``artifact`` names, loading what it needs with ``load_pipeline`` and telling ``progress``
        how far it is; runs in its own worker process, one at a time per file."""
        return None


class PlacesWorker:
    """An axis that says what the case's worker needs from the machine."""

    def gpus(self, case: Case) -> int:
        """How many GPUs (one worker process each) the case runs on."""
        return 1

    def ram_limit_bytes(self, case: Case) -> int | None:
        """Host RAM the case's worker may use (the supervisor enforces it with a cgroup), or None for no limit."""
        return None

    def host_bound(self, case: Case) -> bool:
        """Whether the case's timings depend on the host (CPU, RAM, PCIe) as much as on the GPU."""
        return False


class ChoosesDriftBaseline:
    """An axis with a say in the drift baseline: the bf16 case whose images a setup's images are compared with."""

    # Option values every drift baseline has; options not named may take any value in a drift baseline.
    drift_baseline_values: dict[str, Any] = {}
    # Further values of the plain setup, which the runner runs as a drift baseline when none exists.
    plain_setup_values: dict[str, Any] = {}
    # Values the runner tries, in order, where the plain setup ran out of memory or cannot run.
    drift_baseline_fallbacks: tuple[dict[str, Any], ...] = ()

    def own_drift_baseline(self, case: Case) -> dict[str, Any] | None:
        """Option values that make this case's drift baseline the same setup with them changed, so that the drift
        shows this axis's effect alone; None: the bf16 drift baseline."""
        return None

    def drift_baseline_identity(self, case: Case) -> tuple[Any, ...]:
        """What of this axis a case's drift baseline must share with it (e.g. the GPU kind it ran on)."""
        return ()

    def drift_baseline_rank(self, case: Case) -> int:
        """Among several drift baselines of one case, the lowest rank is preferred."""
        return 0
