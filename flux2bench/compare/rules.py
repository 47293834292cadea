"""The gate's rules: per-metric thresholds, with ``defaults`` and per-block overrides from a gate.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic_core import PydanticCustomError

from flux2bench.metrics import gated
from flux2bench.scenario_yaml import InputFileError, read_yaml


class CompareError(Exception):
    """An input problem (missing run, unreadable rules, incomparable environments); the message is for the user."""


class _Strict(BaseModel):
    """Rules as typed: a number is a finite number (not a string, not a boolean), a switch true or false."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class LatencyRule(_Strict):
    enabled: bool = True
    threshold: float = Field(0.05, ge=0, description="relative change of the median that counts")
    host_threshold: float = Field(0.15, ge=0, description="the same for host-bound timings (loading, offload, CPU)")
    alpha: float = Field(0.10, gt=0, lt=1, description="significance level of the one-sided Mann-Whitney U test")
    gross: float = Field(0.5, gt=0, description="with too few samples for the test, a change that every sample shows "
                                                "beyond this is decided anyway")
    large_improvement: float = Field(0.25, gt=0, description="relative speed-up that counts as suspiciously large")
    # Two runs cannot measure the drift between runs, so ``threshold`` absorbs it; a history of runs measures it (a
    # change point is a significant shift of the series' level), so its floor is lower: same-code reruns of
    # scenarios/ci.yaml on one H100 kept s/step within 1.0% (reports/gate-ci-klein4b-h100-20261126).
    history_threshold: float = Field(0.01, ge=0, description="relative shift of a change point in a history of "
                                                             "runs that counts (flux2bench history --gate)")


class MemoryRule(_Strict):
    enabled: bool = True
    threshold: float = Field(0.02, ge=0, description="relative change that counts")
    floor_gib: float = Field(0.25, ge=0, description="absolute change (GiB) that counts")
    large_improvement: float = Field(0.25, gt=0, description="relative saving that counts as suspiciously large")


class DriftRule(_Strict):
    enabled: bool = True
    max_drop: float = Field(ge=0, description="largest allowed drop from the baseline run's value")


RULE_OF_KIND = {"latency": LatencyRule, "memory": MemoryRule, "drift": DriftRule}

# The rule of every gated metric of the registry, as it applies to one block.
MetricRules = create_model("MetricRules", __base__=_Strict, **{
    spec.name: (RULE_OF_KIND[spec.kind], RULE_OF_KIND[spec.kind](**spec.gate))
    for kind in RULE_OF_KIND for spec in gated(kind)})


Overrides = dict[str, dict[str, Any]]


def _merged(base: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    return {**base, **{metric: {**base.get(metric, {}), **fields} for metric, fields in overrides.items()}}


def _error_lines(err: ValidationError, prefix: str = "") -> list[str]:
    """One ``location: problem`` line per problem. An error of the whole document (the overrides' check) has no
    location of its own: its problems, each with its location, are its lines."""
    lines = []
    for e in err.errors():
        if where := f"{prefix}{'.'.join(map(str, e['loc']))}".rstrip("."):
            lines.append(f"{where}: {e['msg']}")
        else:
            lines += (e.get("ctx") or {}).get("problems") or [e["msg"]]
    return lines


class GateRules(_Strict):
    """The gate's rules: ``defaults`` and ``blocks.<name>`` override some fields of some metrics.

    A block's rules are the built-in ones, then ``defaults``, then that block's overrides::

        fail_on_improvement: false     # also fail on large improvements
        missing_case: regression       # or report
        defaults:
          s_per_image: {threshold: 0.10, alpha: 0.10}
          gpu_reserved_peak_gib: {threshold: 0.02, floor_gib: 0.25}
        blocks:
          offload:
            s_per_image: {threshold: 0.20}
            host_rss_peak_gib: {enabled: false}
    """

    defaults: Overrides = {}
    blocks: dict[str, Overrides] = {}
    fail_on_improvement: bool = False
    missing_case: Literal["regression", "report"] = "regression"

    @model_validator(mode="after")
    def _overrides_are_valid(self) -> GateRules:
        errors = []
        for scope, overrides in [("defaults", self.defaults)] + [(f"blocks.{b}", o) for b, o in self.blocks.items()]:
            try:
                MetricRules.model_validate(_merged(MetricRules().model_dump(), overrides))
            except ValidationError as err:
                errors += _error_lines(err, f"{scope}.")
        if errors:
            raise PydanticCustomError("gate_rules", "{detail}", {"detail": "; ".join(errors), "problems": errors})
        return self

    def for_block(self, block: str) -> BaseModel:
        merged = _merged(_merged(MetricRules().model_dump(), self.defaults), self.blocks.get(block, {}))
        return MetricRules.model_validate(merged)


def load_rules(path: str | Path) -> GateRules:
    """Read a gate.yaml with the scenarios' strict loader; any problem (missing file, bad YAML, a duplicate key,
    nesting, an unknown key, a bad value) is a CompareError."""
    try:
        data = read_yaml(Path(path), "gate rules") or {}
    except InputFileError as exc:
        raise CompareError(f"cannot read gate rules {exc}") from None
    try:
        return GateRules.model_validate(data)
    except ValidationError as err:
        raise CompareError(f"invalid gate rules {path}:\n  " + "\n  ".join(_error_lines(err))) from err
