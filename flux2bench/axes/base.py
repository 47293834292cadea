"""What an axis is: the scenario fields it owns, its support check, its part in loading, and how it is applied.

An axis is one way a setup can vary (precision, offload, attention, ...). Everything the harness knows about
it lives in its own module under ``flux2bench/axes/``; the scenario schema, case keys and labels, the worker,
the drift baseline and the report read axes through this interface only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Generic, TypeVar, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, create_model

from flux2bench.models import COMPONENTS

if TYPE_CHECKING:  # the Case is built from the axes, so it is imported only for the type checker
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
                              description=info.description or ""))
    return tuple(options)


def settings_model_of(name: str, options: tuple[Option, ...]) -> type[Settings]:
    """The settings model of an axis declared the older way, by a tuple of ``Option``."""
    fields: dict[str, Any] = {
        option.name: (option.annotation, Field(option.default, description=option.description or None))
        for option in options}
    return create_model(f"{name.title().replace('_', '')}Settings", __base__=Settings, **fields)


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
    """Base class of the axes: every hook is optional and does nothing unless overridden.

    An axis declares its options as a pydantic model (``settings_model``, a ``Settings`` subclass with one field
    per option; ``ONE_PER_BLOCK`` and ``UNKEYED_AT_DEFAULT`` in a field's ``Annotated`` metadata set what
    ``Option.expands`` and ``Option.keyed_when_default`` say), and reads a case's values typed, through
    ``self.of(case)``. An axis that depends on another asks that axis through one of its methods (e.g.
    ``offload.AXIS.moves_weights(case)``), never by the other's option names.

    The older declaration, ``options = (Option(name, annotation, default, ...), ...)`` without a model, still
    works: a model is built from it, and ``of`` returns it untyped. Converting such an axis is mechanical: each
    ``Option(name, annotation, default, expands=False, keyed_when_default=False, description=d)`` becomes the field
    ``name: Annotated[annotation, ONE_PER_BLOCK, UNKEYED_AT_DEFAULT] = Field(default, description=d)`` of a
    ``Settings`` subclass (leave out the marks whose flag was True), the class is declared ``class XAxis(Axis[XSettings])``
    with ``settings_model = XSettings``, and each ``case.settings["name"]`` becomes ``self.of(case).name``. The
    options, and so the case keys, stay what they were (tests/test_case.py re-derives every committed key). An axis
    with an ``__init__`` of its own calls ``super().__init__()``, which reads the model.
    """

    name: str = ""
    settings_model: type[S]
    options: tuple[Option, ...] = ()
    setup_key: str = ""  # the key of what ``before_load`` / ``apply`` return in the record's setup (default: name)
    # Option values every bf16 drift baseline has; options not named may take any value in a baseline.
    baseline: dict[str, Any] = {}
    # Further values of the plain setup the runner runs as a baseline when none exists.
    reference: dict[str, Any] = {}
    # Values the runner tries, in order, where the plain baseline ran out of memory or cannot run.
    baseline_fallbacks: tuple[dict[str, Any], ...] = ()

    def __init__(self) -> None:
        if hasattr(self, "settings_model"):
            self.options = options_of(self.settings_model)
        else:
            self.settings_model = cast("type[S]", settings_model_of(self.name, self.options))

    def of(self, case: Case) -> S:
        """The case's values of this axis's options, typed."""
        return self.settings_model.model_validate({name: case.settings[name]
                                                   for name in self.settings_model.model_fields})

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

    def refusal(self, case: Case) -> tuple[str, str] | None:
        """(option, why) when no scenario may ask for this case anywhere (a combination of values that cannot be
        run, e.g. a seed that overflows); checked when a scenario is read, before anything is written."""
        return None

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

    def baseline_identity(self, case: Case) -> tuple[Any, ...]:
        """What of this axis a case's drift baseline must share with it (e.g. the GPU kind it ran on)."""
        return ()

    def baseline_rank(self, case: Case) -> int:
        """Among several baselines of one case, the lowest rank is preferred."""
        return 0
