"""What numbers a measurement can give: the checks a record read back passes before anything compares or reports
it (``CaseResult.problems``). A duration or a peak is finite and not negative; the durations the gate divides by
(a step, a whole image, the load) are above zero; a drift metric lies in its range."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import PurePosixPath
from typing import Any

from pydantic import ValidationError

from flux2bench.case import Case
from flux2bench.identity import case_from_dict

# The range each drift metric lies in (a little beyond where float rounding can reach), for records read back.
DRIFT_RANGES: dict[str, tuple[float, float]] = {
    "psnr": (0.0, math.inf), "ssim": (-1.0 - 1e-6, 1.0 + 1e-6), "ms_ssim": (-1.0 - 1e-6, 1.0 + 1e-6),
    "mae": (0.0, 255.0), "lpips": (0.0, math.inf), "latent_cosine": (-1.0 - 1e-6, 1.0 + 1e-6),
    "latent_rel_l2": (0.0, math.inf)}


def first_problem(exc: ValidationError) -> str:
    """The first problem pydantic found, as ``field.path: message``."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def value_problems(at: str, value: float | None, low: float = -math.inf, high: float = math.inf,
                   above: bool = False) -> list[str]:
    """``at: problem`` when ``value`` is NaN, infinite, or outside [low, high] (above ``low`` with ``above``)."""
    if value is None:
        return []
    if not math.isfinite(value):
        return [f"{at}: {value} is not a finite number"]
    if value < low or (above and value == low) or value > high:
        bound = f"above {low:g}" if above else f"at least {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        return [f"{at}: {value!r} is impossible here (must be {bound})"]
    return []


def memory_problems(at: str, memory: dict[str, Any]) -> list[str]:
    return [problem for phase, peaks in memory.items() for f in fields(peaks)
            for problem in value_problems(f"{at}.{phase}.{f.name}.value", getattr(peaks, f.name).value, 0.0)]


def energy_problems(at: str, energy: Any) -> list[str]:
    joules = energy.per_image_j if energy else []
    return [p for i, value in enumerate(joules) for p in value_problems(f"{at}.per_image_j.{i}", value, 0.0)]


def latency_problems(latency: Any) -> list[str]:
    """Durations are finite and not negative; those the gate divides by (load, steps, whole images) above zero."""
    if latency is None:
        return []
    found = value_problems("latency.load_s", latency.load_s, 0.0, above=True)
    found += value_problems("latency.first_call_s", latency.first_call_s, 0.0)
    found += value_problems("latency.time_to_first_image_s", latency.time_to_first_image_s, 0.0)
    found += [p for i, s in enumerate(latency.warmup_s) for p in value_problems(f"latency.warmup_s.{i}", s, 0.0)]
    for stage, samples in latency.stages.items():
        found += [p for i, s in enumerate(samples)
                  for p in value_problems(f"latency.stages.{stage}.{i}", s, 0.0, above=stage == "image")]
    found += [p for i, image in enumerate(latency.steps) for j, s in enumerate(image)
              for p in value_problems(f"latency.steps.{i}.{j}", s, 0.0, above=True)]
    counts = [*latency.compiled_graphs, *(n for call in latency.transformer_calls for n in call)]
    return found + [f"latency: the count {n} is negative" for n in counts if n < 0]


def read_case(data: Any) -> Case:
    """A record's case, held to the scenario schema: a case no scenario could make is not read."""
    from flux2bench.scenario import case_problem  # the scenario schema, which is built from the axes

    if not isinstance(data, dict):
        raise ValueError("case: a JSON object")
    try:
        case = case_from_dict(data)  # its label is derived, through the axes' typed options
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ValueError(f"case: field '{'.'.join(map(str, error['loc']))}': {error['msg']}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"case: {exc}") from None
    if problem := case_problem(case):
        raise ValueError(f"case: {problem}")
    return case


def record_problems(result: Any) -> list[str]:
    """``CaseResult.problems``: what in a record no measurement gives, ``field: problem`` each."""
    found = [f"key: {result.key!r} is not its case's key {result.case.key!r}"] if result.key != result.case.key else []
    found += [f"{name}: {getattr(result, name)!r} is not its case's {getattr(result.case, name)!r}"
              for name in ("block", "weights") if getattr(result, name) != getattr(result.case, name)]
    found += memory_problems("memory", result.memory)
    found += latency_problems(result.latency)
    found += energy_problems("energy", result.energy)
    for rank in result.ranks:
        found += memory_problems(f"ranks.{rank.rank}.memory", rank.memory)
        found += energy_problems(f"ranks.{rank.rank}.energy", rank.energy)
    for name, metric in (result.drift.metrics.items() if result.drift else ()):
        low, high = DRIFT_RANGES.get(name, (-math.inf, math.inf))
        found += value_problems(f"drift.metrics.{name}.value", metric.value, low, high)
    found += value_problems("wall_s", result.wall_s, 0.0)
    if result.wall_split is not None:
        parts = {part: getattr(result.wall_split, part) for part in (*type(result.wall_split).PARTS, "worker_wall_s")}
        found += [p for part, value in parts.items() for p in value_problems(f"wall_split.{part}", value)]
        found += value_problems("wall_split.artifacts_s", result.wall_split.artifacts_s, 0.0)
    found += [f"outputs.{i}: prompt {o.prompt} or seed {o.seed} is not one of its case's"
              for i, o in enumerate(result.outputs) if not 0 <= o.prompt < len(result.case.prompts) or o.seed < 0]
    return found + [problem for name in result.files() if (problem := outside_problem(name))]


def outside_problem(name: str) -> str | None:
    """Why a file a record names is not inside its run directory (an absolute path, ``..``), or None."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        return f"the record names a file outside its run directory: {name!r}"
    return None
