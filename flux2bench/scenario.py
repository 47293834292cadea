"""Scenario files: the validated YAML schema and its expansion into cases.

A scenario file names one or more blocks. Every axis of a block may be one value or a list; a block
expands to the cartesian product of its axes, minus the combinations its ``exclude`` rules match.
All validation happens here, before anything runs: a bad file raises ``ScenarioError`` with a
message that names the file, the block and the field. Expansion is bounded twice: the YAML by the size its
aliases expand to, the matrix by the number of cases it would make, each checked before it is built.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re
from dataclasses import fields
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError,
                      create_model, field_validator, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from flux2bench.axes import registry
from flux2bench.axes.base import Option
from flux2bench.axes.batch import MAX_SEED
from flux2bench.case import Case
from flux2bench.drift_metrics import BY_LIMIT
from flux2bench.identity import new_case
from flux2bench.models import MODELS
from flux2bench.scenario_yaml import MAX_CASES, MAX_YAML_VALUES, ScenarioError, read_yaml  # noqa: F401 - re-exported

WEIGHTS = ("synthetic", "pretrained", "checkpoint")
MAX_REFERENCE_IMAGES = 10
RESOLUTION_MULTIPLE = 16
# A guard against typos (10240 for 1024), not a model limit: a side of 8192 is already 16 times the pixels of
# 2048x2048.
MAX_RESOLUTION_SIDE = 8192
# Case keys are "<block>-<12 hex>" and name files (results/<key>.json, timelines/<key>.csv.gz): 100 characters
# keep them far below the usual 255-byte limit on a file name.
MAX_BLOCK_NAME = 100
# Timed (or warm-up) pipeline calls per prompt and seed: far beyond what any measurement needs, far below a run
# that never ends.
MAX_REPEATS = 1000
# A case's timeout: a week is longer than any case runs; a bound keeps every duration a record holds finite.
MAX_TIMEOUT_S = 7 * 24 * 3600


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
        if side > MAX_RESOLUTION_SIDE:
            raise ValueError(f"{width}x{height}: each side must be at most {MAX_RESOLUTION_SIDE}")
    return width, height


Resolution = Annotated[tuple[int, int], BeforeValidator(_parse_resolution)]


def _check_prompt(value: Any) -> Any:
    if not isinstance(value, (str, dict)):
        raise ValueError(f"{value!r} is not a prompt; write text, or a FLUX.2 JSON prompt (a mapping)")
    return value


Prompt = Annotated[str | dict, BeforeValidator(_check_prompt)]


def _axis(item_type: Any) -> Any:
    """An axis: one value or a non-empty list of values, always stored as a list."""
    return Annotated[list[item_type], BeforeValidator(_as_list), Field(min_length=1)]


class _NoBooleanNumbers(BaseModel):
    """A model whose number fields refuse ``true``/``false`` (pydantic would read them as 1 and 0)."""

    @model_validator(mode="wrap")
    @classmethod
    def _booleans_are_not_numbers(cls, data: Any, handler: Any) -> Any:
        model = handler(data)
        found = []
        for name, raw in data.items() if isinstance(data, dict) else ():
            value = getattr(model, name, None) if isinstance(name, str) else None
            pairs = zip(*(v if isinstance(v, list) else [v] for v in (raw, value)))  # an axis holds a list
            found += [InitErrorDetails(type=PydanticCustomError("boolean_number", "{value} is a boolean, not a number",
                                                                {"value": str(r).lower()}),
                                       loc=(name, i) if isinstance(raw, list) else (name,), input=r)
                      for i, (r, v) in enumerate(pairs) if isinstance(r, bool) and not isinstance(v, bool)]
        if found:  # located at their field, so that one in defaults is reported once, against defaults
            raise ValidationError.from_exception_data(cls.__name__, found)
        return model


def _limit(name: str) -> Any:
    """A drift limit's field: unset by default, within its metric's range (``flux2bench.drift_metrics``)."""
    metric = BY_LIMIT[name]
    return Field(None, ge=metric.low, le=metric.high if math.isfinite(metric.high) else None)


class DriftThresholds(_NoBooleanNumbers):
    """Per-block limits on drift against the bf16 baseline; a case that breaks one gets status drift_fail. Each
    limit lies in its metric's range (a limit outside it would pass or fail every case)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    min_psnr: float | None = _limit("min_psnr")
    min_ssim: float | None = _limit("min_ssim")
    min_ms_ssim: float | None = _limit("min_ms_ssim")
    max_mae: float | None = _limit("max_mae")
    min_latent_cosine: float | None = _limit("min_latent_cosine")
    max_latent_rel_l2: float | None = _limit("max_latent_rel_l2")


class BlockBase(_NoBooleanNumbers):
    """The fields of a block that are not axis options: the model, the workload and how it is measured."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: _axis(Literal[tuple(MODELS)]) = ["flux2-dev"]
    weights: _axis(Literal[WEIGHTS]) = ["synthetic"]
    source: str | None = Field(None, description="hub repo id or local directory for weights: pretrained")
    reference_images: _axis(Annotated[int, Field(ge=0, le=MAX_REFERENCE_IMAGES)]) = [0]
    reference_image_size: Resolution = (1024, 1024)
    resolution: _axis(Resolution) = [(1024, 1024)]
    steps: _axis(Annotated[int, Field(ge=1, le=1000)] | None) = Field(
        [None], description="denoising steps (default: the model's published count, e.g. 50 for dev, 4 for klein)")
    guidance_scale: float | None = Field(None, ge=0, description="guidance scale (default: the model's)")
    seeds: _axis(Annotated[int, Field(ge=0, le=MAX_SEED)]) = [0]
    prompts: _axis(Prompt) = ["A photo of a red fox reading a newspaper in a sunlit cafe"]
    repeats: int = Field(3, ge=1, le=MAX_REPEATS)
    warmup: int = Field(1, ge=0, le=MAX_REPEATS)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    timeout_s: float = Field(1800, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    profile: bool = Field(False, description="profile each case on extra calls after the timed ones (docs/why.md)")
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
    def _exclude_rules(cls, rules: list[dict[str, Any]]) -> list[dict[str, list[Any]]]:
        """Each rule names axes and, for each, a value or a list of values those axes accept; values are normalised
        as the axes' are, a single value to a list of one."""
        checked = []
        for rule in rules:
            unknown = set(rule) - set(AXES)
            if unknown:
                raise ValueError(f"exclude rule {rule} names unknown axes {sorted(unknown)}; axes are {sorted(AXES)}")
            normalised = {}
            for axis, value in rule.items():
                adapter = TypeAdapter(Block.model_fields[axis].rebuild_annotation())
                try:
                    normalised[axis] = adapter.validate_python(value if isinstance(value, list) else [value])
                except ValidationError as exc:
                    raise ValueError(f"exclude rule {rule}: {axis}: {exc.errors()[0]['msg']}") from None
            checked.append(normalised)
        return checked

    @model_validator(mode="after")
    def _consistent(self) -> BlockBase:
        if "pretrained" in self.weights and self.source is None and "tiny" in self.model:
            raise ValueError("weights: pretrained with model: tiny needs source: (a directory written by save_pretrained)")
        for axis in AXES:
            texts = [value for value in getattr(self, axis) if isinstance(value, str)]
            if len({text.casefold() for text in texts}) < len(set(texts)):
                raise ValueError(f"field '{axis}': {texts} names one value twice, in other letter cases; give each "
                                 "value once, spelt one way")
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


def _check_block_name(name: str) -> str:
    if len(name) > MAX_BLOCK_NAME:
        raise ValueError(f"a block name has at most {MAX_BLOCK_NAME} characters (it is part of the case keys, "
                         f"which name files); this one has {len(name)}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError("a block name has only letters, digits, '_', '.' and '-'")
    return name


class ScenarioFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    description: str | None = None
    defaults: dict[str, Any] = {}
    blocks: dict[Annotated[str, AfterValidator(_check_block_name)], dict[str, Any]] = Field(min_length=1)


def _block(name: Any) -> str:
    name = str(name)
    return f"block '{name if len(name) <= MAX_BLOCK_NAME else name[:40] + '...'}'"


def _field(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    """``field 'drift.min_psnr'``, ``field 'steps' item 2``; a one-value axis (stored as a list of one) has no item."""
    names = list(itertools.takewhile(lambda part: isinstance(part, str), loc))
    rest = loc[len(names):]
    if len(names) == 1 and rest and not isinstance(raw.get(names[0]), list):
        rest = rest[1:]
    return f"field '{'.'.join(names)}'" + "".join(f" item {p + 1}" if isinstance(p, int) else f" '{p}'" for p in rest)


def _problem(path: Path, scope: str | None, error: dict[str, Any], raw: dict[str, Any]) -> str:
    """One line per problem: ``file, block 'b', field 'f': message`` (scope and field when there is one); an
    unknown field of a block, or of the file, with the known field it is closest to."""
    message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden" and len(error["loc"]) == 1 and isinstance(error["loc"][0], str):
        known = Block.model_fields if scope else ScenarioFile.model_fields
        message += "".join(f"; did you mean '{name}'?" for name in difflib.get_close_matches(error["loc"][0], known, 1))
    where = [str(path), *filter(None, [scope]), *([_field(error["loc"], raw)] if error["loc"] else [])]
    return f"{', '.join(where)}: {message}"


def _file_problem(path: Path, error: dict[str, Any], raw: dict[str, Any]) -> str:
    """A problem of the file's top level; those under ``blocks`` name their block (``[key]``: its name)."""
    loc = error["loc"]
    if len(loc) >= 2 and loc[0] == "blocks":
        rest = () if loc[2:] == ("[key]",) else loc[2:]
        body = raw["blocks"][loc[1]]
        return _problem(path, _block(loc[1]), {**error, "loc": rest}, body if isinstance(body, dict) else {})
    return _problem(path, None, error, raw)


def _inherited(error: dict[str, Any], defaults: dict[str, Any], body: dict[str, Any]) -> bool:
    """Whether a block's error is in a field it takes from ``defaults`` (reported once, against defaults)."""
    return bool(error["loc"]) and error["loc"][0] in defaults and error["loc"][0] not in body


def _defaults_problems(path: Path, defaults: dict[str, Any]) -> list[str]:
    """The problems of ``defaults`` on their own; a rule between fields (loc ()) is checked in each block instead,
    where the block may supply what the defaults lack."""
    try:
        Block.model_validate(defaults)
    except ValidationError as exc:
        return [_problem(path, "defaults", e, defaults) for e in exc.errors() if e["loc"]]
    return []


def load_scenario(path: str | Path) -> tuple[ScenarioFile, dict[str, BaseModel]]:
    """Read and validate a scenario file; raises ScenarioError with a user-facing message."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: expected a mapping with a 'blocks' key at the top level")
    for name in raw.get("blocks") or {} if isinstance(raw.get("blocks"), dict) else {}:
        if not isinstance(name, str):
            raise ScenarioError(f"{path}: block name {name!r} is not text; a block name has only letters, digits, "
                                "'_', '.' and '-'")
    try:
        scenario = ScenarioFile.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError("\n".join(_file_problem(path, e, raw) for e in exc.errors())) from None
    blocks, problems = {}, _defaults_problems(path, scenario.defaults)
    for name, body in scenario.blocks.items():
        try:
            blocks[name] = Block.model_validate({**scenario.defaults, **body})
        except ValidationError as exc:
            problems += [_problem(path, _block(name), e, body) for e in exc.errors()
                         if not _inherited(e, scenario.defaults, body)]
    if problems:
        raise ScenarioError("\n".join(problems))
    return scenario, blocks


def _excluded(values: dict[str, Any], rules: list[dict[str, list[Any]]]) -> bool:
    """Whether a rule matches the case's axis values: each of its axes has one of the rule's values."""
    return any(all(values[axis] in wanted for axis, wanted in rule.items()) for rule in rules)


def expand_block(name: str, block: BaseModel) -> list[Case]:
    cases = []
    for combo in itertools.product(*(getattr(block, axis) for axis in AXES)):
        values = dict(zip(AXES, combo))
        registry.normalise(values)
        if _excluded(values, block.exclude):
            continue
        width, height = values.pop("resolution")
        settings = {o.name: values.pop(o.name) if o.expands else getattr(block, o.name) for o in registry.options()}
        model = MODELS[values["model"]]
        values["steps"] = values["steps"] or model.steps
        cases.append(new_case(
            block=name, **values, width=width, height=height, settings=settings,
            source=block.source, reference_image_size=block.reference_image_size,
            guidance_scale=model.guidance_scale if block.guidance_scale is None else block.guidance_scale,
            seeds=tuple(block.seeds),
            prompts=tuple(p if isinstance(p, str) else json.dumps(p, sort_keys=True) for p in block.prompts),
            repeats=block.repeats, warmup=block.warmup, device=block.device, timeout_s=block.timeout_s,
            drift_thresholds=tuple(sorted(block.drift.model_dump(exclude_none=True).items())),
            drift_baseline=block.drift_baseline, profile=block.profile,
        ))
    return cases


def _matrix_size(block: BaseModel) -> int:
    """The cases a block expands to before its exclude rules: the product of its axes' lengths."""
    return math.prod(len(getattr(block, axis)) for axis in AXES)


_case_limit: ContextVar[int] = ContextVar("case_limit", default=MAX_CASES)


@contextmanager
def case_limit(max_cases: int) -> Iterator[None]:
    """Set the limit that ``load_cases`` applies when not given ``max_cases``, also inside callers that load
    scenarios themselves (``start_run``, ``resume_run``)."""
    token = _case_limit.set(max_cases)
    try:
        yield
    finally:
        _case_limit.reset(token)


def _check_matrix(blocks: dict[str, BaseModel], path: str | Path, max_cases: int) -> None:
    sizes = {name: _matrix_size(block) for name, block in blocks.items()}
    total = sum(sizes.values())
    if total > max_cases:
        largest = max(sizes, key=sizes.get)
        raise ScenarioError(f"{path}: the blocks expand to {total:,} cases (before exclude rules; the largest, "
                            f"{_block(largest)}, has {sizes[largest]:,}), more than the limit of {max_cases:,}; to "
                            f"run them anyway, raise the limit: --max-cases {total}")


def expand(blocks: dict[str, BaseModel], path: str | Path = "<scenario>", max_cases: int | None = None) -> list[Case]:
    """All cases of a scenario in file order; a case listed twice is kept once. Refuses, before expanding, a
    matrix of more than ``max_cases`` cases (default: ``MAX_CASES``, or the limit set by ``case_limit``)."""
    _check_matrix(blocks, path, _case_limit.get() if max_cases is None else max_cases)
    seen: dict[str, Case] = {}
    for name, block in blocks.items():
        cases = expand_block(name, block)
        if not cases:
            raise ScenarioError(f"{path}, {_block(name)}, field 'exclude': the exclude rules remove every case")
        for case in cases:
            if refused := registry.refusal(case):
                raise ScenarioError(f"{path}, {_block(name)}, field '{refused[0]}': {refused[1]}")
            seen.setdefault(case.key, case)
    return list(seen.values())


# Case fields a block does not name as they are: derived, or held under another name (resolution, drift, options).
_NOT_BLOCK_FIELDS = ("block", "key", "label", "settings", "width", "height", "drift_thresholds")


def _block_fields(case: Case) -> dict[str, Any]:
    """The scenario fields of a block that makes exactly ``case``."""
    data = {f.name: getattr(case, f.name) for f in fields(Case) if f.name not in _NOT_BLOCK_FIELDS}
    data = {name: list(value) if isinstance(value, tuple) else value for name, value in data.items()}
    options = {o.name: [case.settings[o.name]] if o.expands else case.settings[o.name] for o in registry.options()}
    return {**data, "resolution": [[case.width, case.height]], "drift": dict(case.drift_thresholds), **options}


def case_problem(case: Case) -> str | None:
    """Why a case read back (from a record) is not one a scenario makes: a field the scenario schema refuses, a
    combination it refuses, a value other than the one the schema reads, or a key that is not its own; None when it
    is one."""
    try:
        _check_block_name(case.block)
        block = Block.model_validate(_block_fields(case))
    except ValidationError as exc:
        error, message = exc.errors()[0], exc.errors()[0]["msg"].removeprefix("Value error, ")
        return f"{_field(error['loc'], {})}: {message}" if error["loc"] else message
    except (ValueError, TypeError) as exc:
        return str(exc)
    if refused := registry.refusal(case):
        return f"field '{refused[0]}': {refused[1]}"
    (made,) = expand_block(case.block, block)
    differ = [f.name for f in fields(Case) if f.compare and getattr(made, f.name) != getattr(case, f.name)]
    return f"field '{differ[0]}': {getattr(case, differ[0])!r} is not a value the scenario schema gives" if differ \
        else None


def load_cases(path: str | Path, blocks: list[str] | None = None, max_cases: int | None = None) -> list[Case]:
    """The cases of a scenario file, optionally only those of the named blocks; ``max_cases`` as in ``expand``."""
    _, parsed = load_scenario(path)
    if blocks:
        unknown = sorted(set(blocks) - set(parsed))
        if unknown:
            raise ScenarioError(f"{path}: no block named {', '.join(unknown)}; blocks are {', '.join(parsed)}")
        parsed = {name: block for name, block in parsed.items() if name in blocks}
    return expand(parsed, path, max_cases)
