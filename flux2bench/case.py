"""One fully specified benchmark case: what a worker process runs, its stable key and its label."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from flux2bench.axes import registry


@dataclass(frozen=True)
class Case:
    """The model, the workload and how it is measured, plus ``settings``: the value of every axis option."""

    block: str
    model: str
    weights: str
    source: str | None
    reference_images: int
    reference_image_size: tuple[int, int]
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    prompts: tuple[str, ...]
    repeats: int
    warmup: int
    device: str
    timeout_s: float
    settings: dict[str, Any] = field(default_factory=registry.defaults)
    drift_thresholds: tuple[tuple[str, float], ...] = ()
    drift_baseline: str = "run"
    profile: bool = False  # extra profiled calls after the timed ones (flux2bench.profiling)
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", {**registry.defaults(), **self.settings})
        if not self.key:
            object.__setattr__(self, "key", case_key(self))

    @property
    def label(self) -> str:
        heads, tails = [], []
        for axis in registry.AXES:
            head, tail = axis.label(self)
            heads += head
            tails += tail
        refs = [f"refs={self.reference_images}"] if self.reference_images else []
        return " ".join([self.model, *heads, f"{self.width}x{self.height}", f"{self.steps}steps", *refs, *tails])

    def replace(self, **changes: Any) -> Case:
        """A copy with some fields or axis options changed, and its own key."""
        return Case.from_dict({**self.to_dict(), **changes, "key": ""})

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON form records store: the case's fields and its axis options side by side."""
        data = json.loads(json.dumps(asdict(self)))
        return {**data.pop("settings"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Case:
        """Read the flat form; an option missing from an older record takes its default."""
        names = {f.name for f in fields(cls)} - {"settings"}
        unknown = set(data) - names - set(registry.defaults())
        if unknown:
            raise ValueError(f"unknown case fields {sorted(unknown)}")
        core = {name: value for name, value in data.items() if name in names}
        for name in ("reference_image_size", "seeds", "prompts"):
            core[name] = tuple(core[name])
        core["drift_thresholds"] = tuple(tuple(pair) for pair in core.get("drift_thresholds", ()))
        settings = {name: value for name, value in data.items() if name not in names}
        return cls(**core, settings=settings)


# Fields that change neither what is computed nor how it is measured stay out of the key, so that
# a re-run with a longer timeout, or profiled after its timed calls, still matches.
_KEY_EXCLUDED = {"block", "key", "timeout_s", "drift_thresholds", "drift_baseline", "profile"}


def case_key(case: Case) -> str:
    """A stable identifier: the block name plus a hash of everything that defines the measurement.

    Options added after the first release enter the hash only when they differ from their default, so every
    key of an earlier run stays what it was.
    """
    unkeyed = {o.name for o in registry.options() if not o.keyed_when_default and case.settings[o.name] == o.default}
    identity = {k: v for k, v in case.to_dict().items() if k not in _KEY_EXCLUDED | unkeyed}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:12]
    return f"{case.block}-{digest}"
