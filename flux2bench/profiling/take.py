"""The worker's side of a profile: extra pipeline calls after the timed ones, their analysis, the files saved.

``take_profile`` runs after the inference phase's memory tracker closed and after the axes read what the timed calls
revealed, so that no timed number and no recorded peak includes profiling. It makes two calls, each the same call
as a timed image: one under the allocator's history recording (what holds the peak), one under the PyTorch profiler
(where a step goes). Every rank of a case over several GPUs makes the same calls (they hold collectives); rank 0
analyses them and saves the files. Nothing here fails the case: whatever cannot be taken is a reason in the profile.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from flux2bench import flops, gpu_specs
from flux2bench.metrics import s_per_step
from flux2bench.axes import compile as compile_axis
from flux2bench.axes import offload, registry
from flux2bench.axes import precision as precision_axis
from flux2bench.profiling.memory import Counters, load_memory, peak_memory, transient_gib
from flux2bench.profiling.record import LoadMemory, PeakMemory, Profile, StepTime
from flux2bench.profiling.steps import StepFlops, read_trace, step_time
from flux2bench.profiling.weights import components, weight_map
from flux2bench.results import CaseResult
from flux2bench.safe_files import replacing, write_atomic
from flux2bench.trackers.memory import MemorySampler
from flux2bench.units import GIB

FOLDER = "profiles"
MAX_ENTRIES = 2_000_000  # allocator events kept; a call that makes more is refused (its history would be cut)
MAX_SNAPSHOT_BYTES = 512 * 2**20  # a larger snapshot is not saved (the breakdown still is)
DISK_MARGIN_BYTES = 2 * 2**30  # left free on the run directory's disk after saving a file
METHOD = ("extra pipeline calls after the timed ones and after the inference phase's memory tracker closed (no timed "
          "number and no recorded peak includes them), each the same call as a timed image: one under the "
          "allocator's history recording, one under the PyTorch profiler")
NO_CUDA = "no CUDA allocator here (device {device})"
RECOUNTED = "; read again from the record and the saved trace after the run (scripts/recount_profiles.py)"


class Skipped(Exception):
    """A part of the profile that cannot be taken here; its message is the reason."""


def take_profile(pipe: Any, arguments: Callable[[], dict[str, Any]], result: CaseResult, device: torch.device,
                 sampler: MemorySampler, run_dir: Path, rank: int = 0) -> Profile | None:
    """The case's profile (rank 0), or None (other ranks, which make the same calls)."""
    def call() -> dict[str, Any]:  # fresh for each call: its generators start from the case's seeds
        try:
            return arguments()
        except Exception as exc:  # noqa: BLE001 - see _guarded
            raise Skipped(f"the call's inputs could not be prepared: {_describe(exc)}") from exc

    parts = {"memory": _guarded(lambda: _memory(pipe, call, result, device, sampler, run_dir, rank), device),
             "load": _guarded(lambda: _load(pipe, result, device), device),
             "step": _guarded(lambda: _step(pipe, call, result, device, sampler, run_dir, rank), device)}
    if rank != 0:
        return None
    return Profile(METHOD, **{name: value for part, (value, reason) in parts.items()
                              for name, value in ((part, value), (f"{part}_reason", reason))})


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, Skipped) else f"{type(exc).__name__}: {text}"


def _guarded(part: Callable[[], Any], device: torch.device) -> tuple[Any, str | None]:
    try:
        return part(), None
    except Exception as exc:  # noqa: BLE001 - see take_profile
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what an out-of-memory profile call left is not the next part's
        return None, _describe(exc)


def _memory(pipe: Any, call: Callable[[], dict[str, Any]], result: CaseResult, device: torch.device,
            sampler: MemorySampler, run_dir: Path, rank: int) -> PeakMemory | None:
    if device.type != "cuda":
        raise Skipped(NO_CUDA.format(device=device))
    weights, arguments = weight_map(pipe), call()
    compiled = compile_axis.AXIS.of(result.case).compile != "none"
    with _recording(device, sampler) as recorded, _module_labels(pipe, enabled=not compiled) as module_reason:
        with torch.inference_mode():
            pipe(**arguments)
        torch.cuda.synchronize(device)
    if rank != 0:
        return None
    start, end, counters = recorded["start"], recorded["end"], recorded["counters"]
    if len((end.get("device_traces") or [[]])[device.index or 0]) >= MAX_ENTRIES:
        raise Skipped(f"the call made more than {MAX_ENTRIES:,} allocator events: its history would be cut short")
    peak = peak_memory(start, end, device.index or 0, weights, counters)
    peak.module_reason = ("module names are not recorded for a compiled model (hooks on its modules would make it "
                          "recompile)" if compiled else module_reason)
    peak.snapshot, peak.snapshot_reason = _save_snapshot(end, run_dir, result.key)
    return peak


@contextmanager
def _recording(device: torch.device, sampler: MemorySampler) -> Iterator[dict[str, Any]]:
    """Record the allocator's history (with Python frames of each allocation) around the block; yields, once the
    block has ended, the snapshots at its start and end and the counters over it."""
    recorded: dict[str, Any] = {}
    torch.cuda.synchronize(device)
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=MAX_ENTRIES)
    try:
        torch.cuda.reset_peak_memory_stats(device)
        recorded["start"] = torch.cuda.memory._snapshot()
        sampler.open_window("profile-memory")
        try:
            yield recorded
        finally:
            sampled = sampler.close_window("profile-memory")
            recorded["end"] = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    device_peak = sampled.get("gpu_used_gib")
    recorded["counters"] = Counters(
        torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device),
        None if device_peak is None else int(device_peak * GIB), sampler.gpu_unavailable)


@contextmanager
def _module_labels(pipe: Any, enabled: bool) -> Iterator[str | None]:
    """Name each allocation after the module running when it was made (the allocator's metadata, set by forward
    hooks); yields why not, where it cannot."""
    label = getattr(torch.cuda.memory, "_set_memory_metadata", None)
    if not enabled or label is None:
        yield None if not enabled else f"torch {torch.__version__} attaches no metadata to allocations"
        return
    stack: list[str] = []

    def enter(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            stack.append(name)
            label(name)
        return hook

    def leave(*_: Any) -> None:
        if stack:
            stack.pop()
        label(stack[-1] if stack else "")

    handles = []
    for component, module in components(pipe).items():
        for name, child in module.named_modules(prefix=component):
            handles += [child.register_forward_pre_hook(enter(name)), child.register_forward_hook(leave)]
    try:
        yield None
    finally:
        for handle in handles:
            handle.remove()
        label("")


def _save_snapshot(snapshot: dict[str, Any], run_dir: Path, key: str) -> tuple[str | None, str | None]:
    data = pickle.dumps(snapshot)
    if len(data) > MAX_SNAPSHOT_BYTES:
        return None, f"the snapshot is {len(data) / 2**20:.0f} MiB, more than {MAX_SNAPSHOT_BYTES // 2**20} MiB: not saved"
    folder = run_dir / FOLDER
    folder.mkdir(exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free - len(data) < DISK_MARGIN_BYTES:
        return None, f"the disk has {free / GIB:.1f} GiB free: the {len(data) / 2**20:.0f} MiB snapshot is not saved"
    name = f"{FOLDER}/{key}.snapshot.pickle"
    write_atomic(run_dir / name, data)
    return name, None


def _load(pipe: Any, result: CaseResult, device: torch.device) -> LoadMemory:
    if device.type != "cuda":
        raise Skipped(NO_CUDA.format(device=device))
    load = result.memory.get("load")
    peak = load.gpu_allocated_peak_gib.value if load is not None else None
    return load_memory(weight_map(pipe), peak, offload.AXIS.moves_weights(result.case))


def profiled_step(steps: int) -> int:
    """The step the profiler records: the middle one, never the first when there are two or more."""
    return steps // 2


def _step(pipe: Any, call: Callable[[], dict[str, Any]], result: CaseResult, device: torch.device,
          sampler: MemorySampler, run_dir: Path, rank: int) -> StepTime | None:
    index, arguments = profiled_step(result.case.steps), call()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=max(index - 1, 0), warmup=min(index, 1), active=1, repeat=1)
    sampler.open_window("profile-step")  # names the timeline's rows of this call
    with torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=True) as profiler:
        def on_step_end(pipe_: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the step's kernels end inside its span
            profiler.step()
            return {}

        with torch.inference_mode():
            pipe(**arguments, callback_on_step_end=on_step_end)
    sampler.close_window("profile-step")
    if rank != 0:
        return None
    trace = _save_trace(profiler, run_dir, result.key)
    return _count_step(result, run_dir, trace, "cuda" if device.type == "cuda" else "cpu", index)


def _count_step(result: CaseResult, run_dir: Path, trace: str, activity: str, index: int) -> StepTime:
    median = s_per_step(result)
    timed = median * 1e3 if median else None
    found, reason = _flops(result, activity == "cuda")
    step = step_time(read_trace(run_dir / trace), activity, timed, found, reason, step_index=index)
    step.trace = trace
    return step


def recount_profile(result: CaseResult, run_dir: Path) -> bool:
    """Read a record's profile again from what it saved, with today's code: the profiled step counted again from
    its trace by ``CATEGORY_RULES``, and a load part without the load phase's allocator peak given the record's.
    How a record made by an earlier version gets a corrected reading without running anything; whether anything
    was read again."""
    profile = result.profile
    if profile is None:
        return False
    changed = False
    if profile.step is not None and profile.step.trace is not None:
        step = _count_step(result, run_dir, profile.step.trace, profile.step.activity, profile.step.step_index)
        step.method += RECOUNTED
        profile.step, changed = step, True
    load, phase = profile.load, result.memory.get("load")
    if load is not None and load.allocated_peak_gib is None and phase is not None:
        peak = phase.gpu_allocated_peak_gib.value
        if peak is not None:
            profile.load = dataclasses.replace(load, allocated_peak_gib=peak,
                                               transient_gib=transient_gib(load.weights_gib, peak),
                                               method=load.method + RECOUNTED)
            changed = True
    return changed


def _save_trace(profiler: Any, run_dir: Path, key: str) -> str:
    """The trace as gzip-compressed Chrome JSON in the run directory (written plain, then compressed, inside it)."""
    folder = run_dir / FOLDER
    folder.mkdir(exist_ok=True)
    plain, name = folder / f"{key}.trace.json", f"{FOLDER}/{key}.trace.json.gz"
    with suppress(FileNotFoundError):
        os.unlink(plain)  # whatever was there, a link included: torch writes a new file
    try:
        profiler.export_chrome_trace(str(plain))
        with open(plain, "rb") as source, replacing(run_dir / name) as out, \
                gzip.GzipFile(fileobj=out, mode="wb") as target:
            shutil.copyfileobj(source, target)
    finally:
        if plain.exists():
            os.unlink(plain)
    return name


def _flops(result: CaseResult, on_gpu: bool) -> tuple[StepFlops | None, str | None]:
    total, attention = flops.step_flops(result), flops.step_attention_flops(result)
    if total.value is None or attention.value is None:
        return None, total.reason or attention.reason
    gpus = registry.gpus(result.case)
    precision = precision_axis.AXIS.of(result.case).precision
    name = result.setup.gpu if on_gpu else None
    return StepFlops((total.value - attention.value) / gpus, attention.value / gpus,
                     f"{attention.method}; divided by the case's {gpus} GPU(s)",
                     gpu_specs.dense_peak(name, precision), gpu_specs.dense_peak(name, "bf16")), None
