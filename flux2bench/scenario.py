"""Scenario files: the validated YAML schema and its expansion into cases.

A scenario file names one or more blocks. Every axis of a block may be one value or a list; a block
expands to the cartesian product of its axes, minus the combinations its ``exclude`` rules match.
All validation happens here, before anything runs: a bad file raises ``ScenarioError`` with a
message that names the file, the block and the field.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, create_model,
                      field_validator, model_validator)

from flux2bench.axes import registry
from flux2bench.axes.base import Option
from flux2bench.case import Case
from flux2bench.models import MODELS

WEIGHTS = ("synthetic", "pretrained")
MAX_REFERENCE_IMAGES = 10
RESOLUTION_MULTIPLE = 16


class ScenarioError(Exception):
    """A scenario file that cannot be run; the message is meant for the user as is."""


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


def _parse_resolution(value: Any) -> tuple[int, int]:
    """Accept ``1024``, ``"1024"``, ``"1024x768"`` (width x height) or ``[1024, 768]``."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a resolution")
    if isinstance(value, int):
        width = height = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        width = height = int(value)
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)):
        width, height = int(m.group(1)), int(m.group(2))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        width, height = value
    else:
        raise ValueError(f"{value!r} is not a resolution; write WIDTHxHEIGHT such as 1024x768, or one number for a square")
    for side in (width, height):
        if side <= 0 or side % RESOLUTION_MULTIPLE:
            raise ValueError(f"{width}x{height}: each side must be a positive multiple of {RESOLUTION_MULTIPLE}")
    return width, height


Resolution = Annotated[tuple[int, int], BeforeValidator(_parse_resolution)]


def _axis(item_type: Any) -> Any:
    """An axis: one value or a non-empty list of values, always stored as a list."""
    return Annotated[list[item_type], BeforeValidator(_as_list), Field(min_length=1)]


class DriftThresholds(BaseModel):
    """Per-block limits on drift against the bf16 baseline; a case that breaks one gets status drift_fail."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_psnr: float | None = None
    min_ssim: float | None = None
    min_ms_ssim: float | None = None
    max_mae: float | None = None
    min_latent_cosine: float | None = None
    max_latent_rel_l2: float | None = None


class BlockBase(BaseModel):
    """The fields of a block that are not axis options: the model, the workload and how it is measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: _axis(Literal[tuple(MODELS)]) = ["flux2-dev"]
    weights: _axis(Literal[WEIGHTS]) = ["synthetic"]
    source: str | None = Field(None, description="hub repo id or local directory for weights: pretrained")
    reference_images: _axis(Annotated[int, Field(ge=0, le=MAX_REFERENCE_IMAGES)]) = [0]
    reference_image_size: Resolution = (1024, 1024)
    resolution: _axis(Resolution) = [(1024, 1024)]
    steps: _axis(Annotated[int, Field(ge=1, le=1000)]) = [50]
    guidance_scale: float = Field(4.0, ge=0)
    seeds: _axis(Annotated[int, Field(ge=0)]) = [0]
    prompts: _axis(str | dict) = ["A photo of a red fox reading a newspaper in a sunlit cafe"]
    repeats: int = Field(3, ge=1)
    warmup: int = Field(1, ge=0)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    timeout_s: float = Field(1800, gt=0)
    drift: DriftThresholds = DriftThresholds()
    # run: run a missing bf16 baseline; existing: only use baselines already in the run; off: no drift
    drift_baseline: Literal["run", "existing", "off"] = "run"
    exclude: list[dict[str, Any]] = []

    @field_validator("prompts")
    @classmethod
    def _prompts_render(cls, prompts: list[str | dict]) -> list[str | dict]:
        for prompt in prompts:
            if isinstance(prompt, str) and not prompt.strip():
                raise ValueError("a prompt must not be empty")
        return prompts

    @field_validator("exclude")
    @classmethod
    def _exclude_rules(cls, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each rule names axes and values those axes accept; values are normalised as the axes' are."""
        checked = []
        for rule in rules:
            unknown = set(rule) - set(AXES)
            if unknown:
                raise ValueError(f"exclude rule {rule} names unknown axes {sorted(unknown)}; axes are {sorted(AXES)}")
            normalised = {}
            for axis, value in rule.items():
                adapter = TypeAdapter(Block.model_fields[axis].rebuild_annotation())
                try:
                    normalised[axis] = adapter.validate_python(value if isinstance(value, list) else [value])[0]
                except ValidationError as exc:
                    raise ValueError(f"exclude rule {rule}: {axis}: {exc.errors()[0]['msg']}") from None
            checked.append(normalised)
        return checked

    @model_validator(mode="after")
    def _consistent(self) -> BlockBase:
        if "pretrained" in self.weights and self.source is None and "tiny" in self.model:
            raise ValueError("weights: pretrained with model: tiny needs source: (a directory written by save_pretrained)")
        return self


def _option_field(option: Option) -> tuple[Any, Any]:
    if option.expands:
        return _axis(option.annotation), Field([option.default], description=option.description)
    return option.annotation, Field(option.default, description=option.description)


# One block of a scenario file: a matrix of axes plus the settings shared by its cases.
Block = create_model("Block", __base__=BlockBase, **{o.name: _option_field(o) for o in registry.options()})

# Fields that expand into separate cases (each case is a separate process with its own model load), in the
# order of the cartesian product.
WORKLOAD_AXES = ("reference_images", "resolution", "steps")
AXES = ("model", "weights", *(o.name for o in registry.options() if o.expands), *WORKLOAD_AXES)


class ScenarioFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    description: str | None = None
    defaults: dict[str, Any] = {}
    blocks: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")], dict[str, Any]] = Field(min_length=1)


def _location(path: Path, loc: tuple[Any, ...]) -> str:
    parts = [str(path)]
    if len(loc) >= 2 and loc[0] == "blocks":
        parts.append(f"block '{loc[1]}'")
        loc = loc[2:]
    if loc:
        parts.append("field '" + ".".join(str(p) for p in loc) + "'")
    return ", ".join(parts)


def _format_errors(path: Path, err: ValidationError, prefix: tuple[Any, ...] = ()) -> str:
    lines = []
    for e in err.errors():
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{_location(path, prefix + tuple(e['loc']))}: {message}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that rejects a key given twice in one mapping instead of silently keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_scenario(path: str | Path) -> tuple[ScenarioFile, dict[str, BaseModel]]:
    """Read and validate a scenario file; raises ScenarioError with a user-facing message."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ScenarioError(f"{path}: is a directory, not a scenario file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(f"{path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: expected a mapping with a 'blocks' key at the top level")
    try:
        scenario = ScenarioFile.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(_format_errors(path, exc)) from None
    blocks, errors = {}, []
    for name, body in scenario.blocks.items():
        if not isinstance(body, dict):
            errors.append(f"{path}, block '{name}': expected a mapping of axes")
            continue
        try:
            blocks[name] = Block.model_validate({**scenario.defaults, **body})
        except ValidationError as exc:
            errors.append(_format_errors(path, exc, ("blocks", name)))
    if errors:
        raise ScenarioError("\n".join(errors))
    return scenario, blocks


def _excluded(values: dict[str, Any], rules: list[dict[str, Any]]) -> bool:
    return any(all(values[axis] == wanted for axis, wanted in rule.items()) for rule in rules)


def expand_block(name: str, block: BaseModel) -> list[Case]:
    cases = []
    for combo in itertools.product(*(getattr(block, axis) for axis in AXES)):
        values = dict(zip(AXES, combo))
        registry.normalise(values)
        if _excluded(values, block.exclude):
            continue
        width, height = values.pop("resolution")
        settings = {o.name: values.pop(o.name) if o.expands else getattr(block, o.name) for o in registry.options()}
        cases.append(Case(
            block=name, **values, width=width, height=height, settings=settings,
            source=block.source, reference_image_size=block.reference_image_size,
            guidance_scale=block.guidance_scale, seeds=tuple(block.seeds),
            prompts=tuple(p if isinstance(p, str) else json.dumps(p, sort_keys=True) for p in block.prompts),
            repeats=block.repeats, warmup=block.warmup, device=block.device, timeout_s=block.timeout_s,
            drift_thresholds=tuple(sorted(block.drift.model_dump(exclude_none=True).items())),
            drift_baseline=block.drift_baseline,
        ))
    return cases


def expand(blocks: dict[str, BaseModel], path: str | Path = "<scenario>") -> list[Case]:
    """All cases of a scenario in file order; a case listed twice is kept once."""
    seen: dict[str, Case] = {}
    for name, block in blocks.items():
        cases = expand_block(name, block)
        if not cases:
            raise ScenarioError(f"{path}, block '{name}', field 'exclude': the exclude rules remove every case")
        for case in cases:
            seen.setdefault(case.key, case)
    return list(seen.values())


def load_cases(path: str | Path, blocks: list[str] | None = None) -> list[Case]:
    """The cases of a scenario file, optionally only those of the named blocks."""
    _, parsed = load_scenario(path)
    if blocks:
        unknown = sorted(set(blocks) - set(parsed))
        if unknown:
            raise ScenarioError(f"{path}: no block named {', '.join(unknown)}; blocks are {', '.join(parsed)}")
        parsed = {name: block for name, block in parsed.items() if name in blocks}
    return expand(parsed, path)
