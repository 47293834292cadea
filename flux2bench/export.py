"""Export a run in pytest-benchmark's JSON format, so that dashboards and tools reading it can track flux2bench.

The layout is the one pytest-benchmark writes with ``--benchmark-json`` (``machine_info``,
``commit_info``, ``benchmarks``, ``datetime``, ``version``), and each benchmark's ``stats`` are
computed exactly as pytest-benchmark computes them, from the seconds per timed image. Cases that
ran (``ok``, ``drift_fail``) and have image samples become benchmarks; seconds per step, load
time and the peaks of every memory phase go into ``extra_info``.
"""

from __future__ import annotations

import json
import statistics
from bisect import bisect_left, bisect_right
from pathlib import Path
from typing import Any

from flux2bench.metrics import PHASES, of_kind, peak, s_per_step
from flux2bench.results import IMAGE, CaseResult
from flux2bench.preflight import output_problem
from flux2bench.safe_files import make_folders, write_atomic
from flux2bench.store import RunStore

# The pytest-benchmark release whose JSON layout (and quartile method) this follows.
FORMAT_VERSION = "5.2.3"


def _quartiles(data: list[float]) -> tuple[float, float]:
    """Q1 and Q3 by pytest-benchmark's method (Wikipedia's method 3 for odd counts, method 2 for even)."""
    n = len(data)
    if n == 1:
        return data[0], data[0]
    if n % 2 == 0:
        return statistics.median(data[: n // 2]), statistics.median(data[n // 2:])
    k, r = divmod(n, 4)
    if r == 1:
        return 0.25 * data[k - 1] + 0.75 * data[k], 0.75 * data[3 * k] + 0.25 * data[3 * k + 1]
    return 0.75 * data[k] + 0.25 * data[k + 1], 0.25 * data[3 * k + 1] + 0.75 * data[3 * k + 2]


def benchmark_stats(samples: list[float]) -> dict[str, Any]:
    """pytest-benchmark's ``stats`` object (one round per sample, one iteration per round)."""
    data = sorted(samples)
    n, total, mean = len(data), sum(samples), statistics.mean(samples)
    stddev = statistics.stdev(data) if n > 1 else 0
    q1, q3 = _quartiles(data)
    iqr = q3 - q1
    low, high = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    iqr_outliers = sum(not low <= x <= high for x in data)
    stddev_outliers = sum(not mean - stddev <= x <= mean + stddev for x in data)
    return {
        "min": data[0], "max": data[-1], "mean": mean, "stddev": stddev, "rounds": n,
        "median": statistics.median(data), "iqr": iqr, "q1": q1, "q3": q3,
        "iqr_outliers": iqr_outliers, "stddev_outliers": stddev_outliers,
        "outliers": f"{stddev_outliers};{iqr_outliers}",
        "ld15iqr": data[0] if n == 1 else data[bisect_left(data, low)],
        "hd15iqr": data[-1] if n == 1 else data[min(bisect_right(data, high), n - 1)],
        "ops": n / total if total else 0, "total": total, "data": list(samples), "iterations": 1,
    }


def _extra_info(result: CaseResult) -> dict[str, Any]:
    memory = {f"{phase}_{spec.name}": peak(result, spec.name, phase).value
              for phase in PHASES if phase in result.memory for spec in of_kind("memory")}
    return {"key": result.key, "block": result.block, "status": result.status, "weights": result.weights,
            "gpu": result.setup.gpu,
            "s_per_step": s_per_step(result), "steps_per_image": [len(s) for s in result.latency.steps],
            "load_s": result.latency.load_s, "latency_method": result.latency.method, **memory}


def _benchmark(result: CaseResult, scenario: str) -> dict[str, Any]:
    name = f"{result.key}[{result.label}]"
    return {
        "group": result.block,
        "name": name,
        "fullname": f"{scenario}::{name}",
        "params": result.case.to_dict(),
        "param": result.label,
        "extra_info": _extra_info(result),
        "options": {"disable_gc": False, "timer": result.latency.method, "min_rounds": len(result.latency.stages[IMAGE]),
                    "max_time": None, "min_time": None, "warmup": len(result.latency.warmup_s)},
        "stats": benchmark_stats(result.latency.stages[IMAGE]),
    }


def _machine_info(env: dict[str, Any]) -> dict[str, Any]:
    """pytest-benchmark's machine_info keys from what the run recorded (None where it did not), plus the GPU."""
    return {
        "node": None, "processor": None, "machine": None, "python_compiler": None, "python_implementation": None,
        "python_implementation_version": None, "python_version": env.get("python"), "python_build": None,
        "release": None, "system": None, "platform": env.get("platform"),
        "cpu": {"brand_raw": env.get("cpu"), "count": env.get("cpu_count")},
        "gpu": env.get("gpu_name"), "gpu_memory_gib": env.get("gpu_memory_gib"), "driver": env.get("driver"),
        "cuda": env.get("cuda"), "versions": env.get("versions", {}),
    }


def _commit_info(env: dict[str, Any]) -> dict[str, Any]:
    commit = env.get("git_commit") or "unknown"
    return {"id": commit.removesuffix("-dirty"), "time": None, "author_time": None,
            "dirty": commit.endswith("-dirty"), "project": "flux2bench", "branch": None}


def to_pytest_benchmark(store: RunStore) -> dict[str, Any]:
    """The run as pytest-benchmark's JSON document."""
    meta = store.meta
    env = meta.get("environment") or {}
    scenario = meta.get("scenario_path") or "scenario"
    results = [r for r in store.results()
               if r.status.ran and r.latency and r.latency.stages.get(IMAGE)]
    return {
        "machine_info": _machine_info(env),
        "commit_info": _commit_info(env),
        "benchmarks": [_benchmark(r, scenario) for r in results],
        "datetime": meta.get("created_at"),
        "version": FORMAT_VERSION,
    }


def write_pytest_benchmark(run_dir: str | Path, out_path: str | Path) -> Path:
    """Write ``run_dir``'s export to ``out_path`` (its missing folders made); a missing run directory raises
    FileNotFoundError, an output that cannot or may not be written (inside a run directory, other than
    ``run_dir/pytest-benchmark.json``) ValueError."""
    out = Path(out_path)
    if problem := output_problem("output", out, own=Path(run_dir) / "pytest-benchmark.json"):
        raise ValueError(problem)
    document = to_pytest_benchmark(RunStore.open(run_dir))
    make_folders(out.parent)
    write_atomic(out, json.dumps(document, indent=4, ensure_ascii=True))
    return out
