"""What numbers a measurement can give: the checks a record read back passes before anything compares or reports
it (``CaseResult.problems``). A duration or a peak is finite and not negative; the durations the gate divides by
(a step, a whole call, the load) are at least a microsecond; a drift metric lies in its range. The numbers of one
record agree with each other: a call's steps and stages fit in the call, the load and the calls each fit in the
case's wall time, no allocator peak is above its reserved peak; a case that ran (``ok``, ``drift_fail``) has what every
such case measures. ``machine_problems`` holds the peaks to the machines run.json lists (a card's memory, the host's
RAM)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import PurePosixPath
from typing import Any

from pydantic import ValidationError

from flux2bench.case import Case
from flux2bench.drift_metrics import DRIFT_METRICS
from flux2bench.identity import case_from_dict

# The range each drift metric lies in (as far beyond as float rounding can reach), for records read back.
DRIFT_RANGES: dict[str, tuple[float, float]] = {m.name: (m.low - m.rounding, m.high + m.rounding)
                                                for m in DRIFT_METRICS}
# The shortest duration a clock read around a step, a pipeline call or the load gives (each runs a model's forward,
# a synchronize and Python around it): far below any measured (the shortest committed step is 3.4 ms), far above
# what no clock reads.
MIN_TIMED_S = 1e-6
# The runner's wall time of a worker that did not report holds the wait for the fork server and the worker's run,
# each up to the case's timeout_s, and stopping it (a kill, then up to 5 s for its last events).
STOP_S = 60.0
# How far float rounding may carry a sum of durations beyond the interval they lie in, relative to it.
ROUNDING = 1e-9
GPU_PEAKS = ("gpu_allocated_peak_gib", "gpu_reserved_peak_gib", "gpu_device_peak_gib")
HOST_PEAKS = ("host_rss_peak_gib", "host_anon_peak_gib", "host_file_peak_gib", "host_pinned_peak_gib",
              "host_shared_peak_gib")


def first_problem(exc: ValidationError) -> str:
    """The first problem pydantic found, as ``field.path: message`` (a validator's own message without pydantic's
    "Value error, ")."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


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


def exceeds(part: float, whole: float) -> bool:
    """Whether ``part`` (a sum of durations or a peak) is above ``whole`` beyond float rounding."""
    return part > whole * (1 + ROUNDING)


def memory_problems(at: str, memory: dict[str, Any]) -> list[str]:
    """Peaks are finite and not negative; the allocator never holds more than it has reserved."""
    found = [problem for phase, peaks in memory.items() for f in fields(peaks)
             for problem in value_problems(f"{at}.{phase}.{f.name}.value", getattr(peaks, f.name).value, 0.0)]
    if found:
        return found
    for phase, peaks in memory.items():
        allocated, reserved = peaks.gpu_allocated_peak_gib.value, peaks.gpu_reserved_peak_gib.value
        if allocated is not None and reserved is not None and exceeds(allocated, reserved):
            found.append(f"{at}.{phase}.gpu_allocated_peak_gib.value: {allocated!r} GiB is above the reserved peak "
                         f"{reserved!r} GiB, which holds every allocation")
    return found


def energy_problems(at: str, energy: Any) -> list[str]:
    joules = energy.per_image_j if energy else []
    return [p for i, value in enumerate(joules) for p in value_problems(f"{at}.per_image_j.{i}", value, 0.0)]


def latency_problems(latency: Any, longest: float = math.inf) -> list[str]:
    """Durations are finite, not negative and at most ``longest`` (the case's ``timeout_s``: its worker is stopped
    then); those the gate divides by (load, steps, whole calls) at least ``MIN_TIMED_S``."""
    if latency is None:
        return []
    found = value_problems("latency.load_s", latency.load_s, MIN_TIMED_S, longest)
    found += value_problems("latency.first_call_s", latency.first_call_s, 0.0, longest)
    found += value_problems("latency.time_to_first_image_s", latency.time_to_first_image_s, 0.0, longest)
    found += [p for i, s in enumerate(latency.warmup_s)
              for p in value_problems(f"latency.warmup_s.{i}", s, 0.0, longest)]
    for stage, samples in latency.stages.items():
        low = MIN_TIMED_S if stage == "image" else 0.0
        found += [p for i, s in enumerate(samples) for p in value_problems(f"latency.stages.{stage}.{i}", s, low,
                                                                             longest)]
    found += [p for i, image in enumerate(latency.steps) for j, s in enumerate(image)
              for p in value_problems(f"latency.steps.{i}.{j}", s, MIN_TIMED_S, longest)]
    counts = [*latency.compiled_graphs, *(n for call in latency.transformer_calls for n in call)]
    return found + [f"latency: the count {n} is negative" for n in counts if n < 0]


def call_problems(latency: Any) -> list[str]:
    """Each timed call holds its parts: its denoising steps, one after another, and its stages (text encoding,
    reference encoding, the denoising loop, the decode), one after another, take no longer than the call."""
    calls = latency.stages.get("image") or []
    found = []
    for i, call in enumerate(calls):
        steps = math.fsum(latency.steps[i]) if i < len(latency.steps) else 0.0
        if exceeds(steps, call):
            found.append(f"latency.steps.{i}: its steps sum to {steps:.6g} s, more than the call they ran in "
                         f"(latency.stages.image.{i}: {call:.6g} s)")
        parts = math.fsum(samples[i] for stage, samples in latency.stages.items()
                          if stage != "image" and i < len(samples))
        if exceeds(parts, call):
            found.append(f"latency.stages: call {i}'s stages sum to {parts:.6g} s, more than the call itself "
                         f"(latency.stages.image.{i}: {call:.6g} s)")
    return found


def wall_problems(result: Any) -> list[str]:
    """The load, and the warm-up and timed calls (one after another), each lie inside the case's wall time."""
    latency = result.latency
    if latency is None or result.wall_s is None:
        return []
    calls = math.fsum([*latency.warmup_s, *(latency.stages.get("image") or [])])
    for what, seconds in (("the load (latency.load_s)", latency.load_s or 0.0),
                          ("the warm-up and timed calls", calls)):
        if exceeds(seconds, result.wall_s):
            return [f"wall_s: {result.wall_s:.6g} s is less than {what} it holds ({seconds:.6g} s)"]
    return []


def ran_problems(result: Any) -> list[str]:
    """What every case that ran to the end (``ok``, ``drift_fail``) timed: its load, and every timed call with its
    denoising steps. A record without them has no timings to compare, yet claims a working setup."""
    if not result.status.ran:
        return []
    status, latency = result.status.value, result.latency
    if latency is None:
        return [f"latency: a case with status {status} was timed; this record has no timings"]
    calls = latency.stages.get("image") or []
    if latency.load_s is None:
        return [f"latency.load_s: a case with status {status} timed its load; this record has no load time"]
    if not calls:
        return [f"latency.stages.image: a case with status {status} timed its calls; this record has none"]
    if len(latency.steps) != len(calls) or not all(latency.steps):
        return [f"latency.steps: a case with status {status} times the denoising steps of each of its {len(calls)} "
                f"timed calls; this record has steps for {sum(1 for steps in latency.steps if steps)}"]
    return count_problems(result)


def count_problems(result: Any) -> list[str]:
    """A case that ran timed what its case asks, no more and no less: ``warmup`` warm-up calls, ``repeats`` calls
    per prompt and seed, each stage once per timed call, ``steps`` denoising steps in each. More samples than
    measured would give the gate's tests power they do not have."""
    case, latency = result.case, result.latency
    calls = len(latency.stages.get("image") or [])
    expected = case.repeats * len(case.prompts) * len(case.seeds)
    if calls != expected:
        return [f"latency.stages.image: {calls} timed calls; its case makes {expected} ({case.repeats} repeats x "
                f"{len(case.prompts)} prompts x {len(case.seeds)} seeds)"]
    if len(latency.warmup_s) != case.warmup:
        return [f"latency.warmup_s: {len(latency.warmup_s)} warm-up calls; its case makes {case.warmup}"]
    found = [f"latency.stages.{stage}: {len(samples)} samples for {calls} timed calls"
             for stage, samples in latency.stages.items() if len(samples) != calls]
    found += [f"latency.steps.{i}: {len(steps)} steps; its case makes {case.steps}"
              for i, steps in enumerate(latency.steps) if len(steps) != case.steps]
    return found[:1]


def rank_problems(result: Any) -> list[str]:
    """The ranks of a case split over GPUs: each once, one of its case's GPUs (0 to gpus - 1), and each finished
    where the case did."""
    from flux2bench.axes import registry

    gpus, seen = registry.gpus(result.case), set()
    for rank in result.ranks:
        if rank.rank in seen or not 0 <= rank.rank < gpus:
            return [f"ranks: rank {rank.rank} is not one of its case's {gpus} GPU(s) once"]
        seen.add(rank.rank)
        if result.status.ran and not rank.status.ran:
            return [f"ranks.{rank.rank}.status: {rank.status.value} in a case with status {result.status.value}"]
    return []


def unmeasured_memory(result: Any) -> str | None:
    """Why a case that ran to the end has no inference-phase peak, which every one measures (the worker always
    reads its host RSS, and on a GPU the allocator's peaks), or None. The gate holds a record to it where the same
    case of the other run has such a peak (``flux2bench.compare``); records made by hand (tests, tools) may leave
    memory out of both."""
    if not result.status.ran:
        return None
    inference = result.memory.get("inference")
    if inference is None or all(getattr(inference, f.name).value is None for f in fields(inference)):
        return (f"memory.inference: a case with status {result.status.value} measured its inference phase's peaks; "
                "this record has none")
    return None


@dataclass(frozen=True)
class Machines:
    """What a run's run.json says about the machines its cases ran on (the host that created it, its Ray nodes,
    the hosts that resumed it): each GPU model's memory and the largest host RAM, in GiB, for
    ``machine_problems``. A figure run.json does not record bounds nothing."""

    card_gib: dict[str, float] = field(default_factory=dict)  # by GPU model, the largest card of that model
    host_ram_gib: float | None = None

    @classmethod
    def of(cls, meta: dict[str, Any]) -> Machines:
        environments = [meta.get("environment"), *((node or {}).get("environment") for node in
                                                   (meta.get("nodes") or {}).values()),
                        *((session or {}).get("environment") for session in meta.get("resumed") or [])]
        environments = [env for env in environments if isinstance(env, dict)]
        cards: dict[str, float] = {}
        for env in environments:
            for gpu in env.get("gpus") or []:
                size = gpu.get("memory_gib") if isinstance(gpu, dict) else None
                if isinstance(size, (int, float)) and math.isfinite(size) and size > 0:
                    name = str(gpu.get("name"))
                    cards[name] = max(size, cards.get(name, 0.0))
        rams = [ram for env in environments if isinstance(ram := env.get("host_ram_gib"), (int, float))
                and math.isfinite(ram) and ram > 0]
        return cls(cards, max(rams) if rams else None)


def machine_problems(result: Any, machines: Machines) -> list[str]:
    """``field: problem`` for a peak above what the run's machines hold: a GPU peak above the memory of the card
    the case ran on (any card run.json lists, where the record names none), a host peak above the host's RAM."""
    if result.setup.gpu and machines.card_gib and result.setup.gpu not in machines.card_gib:
        return [f"setup.gpu: {result.setup.gpu!r} is none of the GPUs run.json lists "
                f"({', '.join(sorted(machines.card_gib))})"]
    card = machines.card_gib.get(result.setup.gpu) if result.setup.gpu else max(machines.card_gib.values(),
                                                                                 default=None)
    gpu = f"the {result.setup.gpu}'s" if result.setup.gpu else "the largest GPU's"
    memories = [("memory", result.memory), *((f"ranks.{rank.rank}.memory", rank.memory) for rank in result.ranks)]
    found = []
    for at, memory in memories:
        for phase, peaks in memory.items():
            for names, limit, what in ((GPU_PEAKS, card, f"{gpu} memory"), (HOST_PEAKS, machines.host_ram_gib,
                                                                             "the host's RAM")):
                for name in names:
                    value = getattr(peaks, name).value
                    if limit is not None and value is not None and exceeds(value, limit):
                        found.append(f"{at}.{phase}.{name}.value: {value!r} GiB is more than {what} "
                                     f"({limit:.1f} GiB in run.json)")
    return found


def setup_problems(setup: Any) -> list[str]:
    """What an axis wrote into the record's setup, held to that axis's ``record_model`` (the parts the report and
    the metrics read), the first problem only."""
    from flux2bench.axes.registry import AXES, setup_key

    for axis in AXES:
        key = setup_key(axis)
        if axis.record_model is None or key not in setup.axes:
            continue
        try:
            axis.record_model.model_validate(setup.axes[key])
        except ValidationError as exc:
            return [f"setup.{key}.{first_problem(exc)}" if exc.errors()[0]["loc"] else f"setup.{key}: "
                    f"{first_problem(exc)}"]
    return []


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
    """``CaseResult.problems``: what in a record no measurement gives, ``field: problem`` each. Numbers are checked
    one by one first; how they relate (``call_problems``, ``wall_problems``) only once each is a possible one."""
    found = [f"key: {result.key!r} is not its case's key {result.case.key!r}"] if result.key != result.case.key else []
    found += [f"{name}: {getattr(result, name)!r} is not its case's {getattr(result.case, name)!r}"
              for name in ("block", "weights") if getattr(result, name) != getattr(result.case, name)]
    found += memory_problems("memory", result.memory)
    found += latency_problems(result.latency, result.case.timeout_s)
    found += energy_problems("energy", result.energy)
    found += rank_problems(result)
    for rank in result.ranks:
        found += memory_problems(f"ranks.{rank.rank}.memory", rank.memory)
        found += energy_problems(f"ranks.{rank.rank}.energy", rank.energy)
    for name, metric in (result.drift.metrics.items() if result.drift else ()):
        low, high = DRIFT_RANGES.get(name, (-math.inf, math.inf))
        found += value_problems(f"drift.metrics.{name}.value", metric.value, low, high)
    timeout = result.case.timeout_s  # the worker's own wall time, where it reported; else the runner's
    found += value_problems("wall_s", result.wall_s, 0.0, timeout if result.status.ran else 2 * timeout + STOP_S)
    if result.wall_split is not None:
        parts = {part: getattr(result.wall_split, part) for part in (*type(result.wall_split).PARTS, "worker_wall_s",
                                                                     "artifacts_s")}
        found += [p for part, value in parts.items() for p in value_problems(f"wall_split.{part}", value, 0.0)]
    found += [f"outputs.{i}: prompt {o.prompt} or seed {o.seed} is not one of its case's"
              for i, o in enumerate(result.outputs) if not 0 <= o.prompt < len(result.case.prompts) or o.seed < 0]
    found += [problem for name in result.files() if (problem := outside_problem(name))]
    found += ran_problems(result)
    found += setup_problems(result.setup)
    if result.profile and result.profile.step and result.profile.step.step_index >= result.case.steps:
        found.append(f"profile.step.step_index: step {result.profile.step.step_index} of a case of "
                     f"{result.case.steps} steps (counted from 0)")
    if not found and result.latency is not None:
        found += call_problems(result.latency) + wall_problems(result)
    return found


def outside_problem(name: str) -> str | None:
    """Why a file a record names is not inside its run directory (an absolute path, ``..``), or None."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        return f"the record names a file outside its run directory: {name!r}"
    return None
