"""The harness's own cost: where each case's wall time went, and the GPU-seconds held per timed GPU-second.

The worker marks its start, the end of its imports, CUDA's initialisation, the load, the warm-up and the timed
images on one monotonic clock; the runner adds the worker's wall from its side and the artifact workers it ran for
the case. A case holds ``gpus`` device slots for its whole wall time, and measures during ``timed_s`` of it.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

from flux2bench.axes import registry
from flux2bench.results import CaseResult, Latency, WallSplit

METHOD = ("time.perf_counter (CLOCK_MONOTONIC, shared by the runner and its workers) at the spawn, the worker's "
          "first line, the end of its imports, around CUDA's initialisation, the load, each warm-up and timed call "
          "(synchronised); other_s = the runner's worker wall minus the parts")


@dataclass(frozen=True)
class WorkerStart:
    """Clock readings of a worker's start: the runner's just before the spawn (None when not started by the runner),
    the worker's first line and the end of its heavy imports; for a worker forked by the fork server, how long the
    server's imports took (what this worker's own would have: ``imported_before_s``)."""

    spawned: float | None
    started: float
    imported: float
    imported_before_s: float = 0.0

    @property
    def cold_start(self) -> float:
        """Where the time to first image starts: the first line, moved back by imports done before the fork."""
        return self.started - self.imported_before_s


def worker_split(start: WorkerStart | None, cuda_init_s: float | None, latency: Latency | None,
                 compiles: bool) -> WallSplit:
    """The worker's own parts; ``compiles``: the first call compiles (the compile axis is on)."""
    split = WallSplit(METHOD, cuda_init_s=cuda_init_s)
    if start is not None:
        split.imports_s = start.imported - start.started
        if start.spawned is not None:
            split.process_start_s = max(0.0, start.started - start.spawned)
    if latency is None:
        return split
    split.load_s = latency.load_s
    timed = latency.stages.get("image") or []
    split.timed_s = sum(timed)
    warmup = sum(latency.warmup_s)
    split.compile_s = 0.0
    if compiles and latency.warmup_s and timed:
        split.compile_s = max(0.0, latency.warmup_s[0] - statistics.median(timed))
    split.warmup_s = warmup - split.compile_s
    return split


def complete(split: WallSplit, worker_wall_s: float, artifacts_s: float) -> WallSplit:
    """Add the runner's side: the worker's wall, the case's artifact workers, and what no part holds."""
    split.worker_wall_s, split.artifacts_s = worker_wall_s, artifacts_s
    split.other_s = worker_wall_s - sum(getattr(split, part) or 0.0 for part in WallSplit.PARTS if part != "other_s")
    return split


def held_and_timed_gpu_s(result: CaseResult) -> tuple[float, float] | None:
    """GPU-seconds the case held its devices and GPU-seconds it measured; None without a wall-time split."""
    split = result.wall_split
    if split is None or split.held_s() is None or not split.timed_s:
        return None
    gpus = registry.gpus(result.case)
    return split.held_s() * gpus, split.timed_s * gpus


def gpu_s_per_timed_s(result: CaseResult) -> float | None:
    """The case's GPU-seconds held per GPU-second of timed images (1 would be a harness that costs nothing)."""
    pair = held_and_timed_gpu_s(result)
    return pair[0] / pair[1] if pair else None


def run_overhead(results: Iterable[CaseResult], on_gpu: bool = True) -> str | None:
    """One sentence on the run's time held against the time it measured, over the cases with a split: GPU-seconds
    where the cases held GPUs, seconds of their workers in a CPU run."""
    pairs = [pair for r in results if (pair := held_and_timed_gpu_s(r))]
    if not pairs:
        return None
    held, timed = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    cases = f"{len(pairs)} case{'s' * (len(pairs) != 1)}"
    rest = ("(loading, compilation, warm-up, process start and artifact workers are the rest; each record's "
            "wall_split says where it went).")
    if not on_gpu:
        return (f"The cases' workers ran for {held:.0f} s and timed images during {timed:.1f} s of it: "
                f"{held / timed:.1f} s held per timed s over {cases} {rest}")
    return (f"The cases held their GPUs for {held:.0f} GPU-s and timed images during {timed:.1f} GPU-s of it: "
            f"{held / timed:.1f} GPU-s held per timed GPU-s over {cases} {rest}")


def worker_starts(meta: dict[str, Any], results: Iterable[CaseResult]) -> str | None:
    """One sentence on how the run's workers started (forked by the fork server, or fresh) and, where the fork
    server was not used, why; None for records from before it was recorded."""
    counts = Counter((r.wall_split.worker_start if r.wall_split else None) for r in results)
    if not counts.keys() - {None}:
        return None
    unknown = f", {counts[None]} from before this was recorded" if counts[None] else ""
    sentence = (f"Workers: {counts['fork-server']} forked from the run's fork server, {counts['fresh']} started as "
                f"fresh interpreters{unknown} (each case is its own process either way).")
    servers = meta.get("fork_server") or []
    imported = [s["imports_s"] for s in servers if s.get("usable") and isinstance(s.get("imports_s"), (int, float))]
    if imported:
        sentence += f" The fork server's imports took {', '.join(f'{t:.1f}' for t in imported)} s, once per session."
    refused = [s["reason"] for s in servers if not s.get("usable") and s.get("reason")]
    if refused:
        sentence += f" The fork server was not used: {'; '.join(dict.fromkeys(refused))}."
    return sentence
