"""Fits on: per workload and memory size, the fastest finished setup that fits and the one that makes the most images
an hour per GPU (its batch size, and with prices its cost per 1000 images), from measured peaks, emulated caps and
out-of-memory results."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pandas as pd

from flux2bench.axes import offload as offload_axis
from flux2bench.axes import ram_cap, text_encoder, vram_cap
from flux2bench.case import Case
from flux2bench.identity import changed, setup_identity
from flux2bench.metrics import (PSNR, VRAM_NEEDED, by_call_time, host_ram_needed, images_per_hour_per_gpu, s_per_call,
                                usd_per_1000_images, vram_needed)
from flux2bench.report.frame import gpus_of, no_drift_reason
from flux2bench.results import CaseResult, measured_on
from flux2bench.units import GIB

GB = 1e9  # card sizes are sold in GB, measurements are in GiB
GPU_SIZES_GB = (8, 12, 16, 24, 32, 48, 80, 96, 141)
HOST_RAM_GB = (16, 32, 64, 128, 256, 512)
NOTHING_FITS = "nothing measured fits"
FITS_NOTE = ("Card sizes are GB (10^9 bytes); measured peaks are GiB (2^30 bytes). A setup fits when its peak VRAM "
             f"({VRAM_NEEDED}) or the emulated cap it ran ok under is at most the card's size, unless it ran out of "
             "memory under an emulated cap at least that large. Host RAM is the RSS peak, the larger of load and "
             "inference.")
CPU_FITS_NOTE = ("No case of this run ran on a GPU, so no card size is answered. Host RAM sizes are GB (10^9 bytes); "
                 "measured peaks are GiB (2^30 bytes). A setup fits when its RSS peak, the larger of load and "
                 "inference, is at most the size, unless it ran out of host memory under a RAM cap at least that "
                 "large.")


def gb_to_gib(gb: float) -> float:
    return gb * GB / GIB


def workload_of(case: Case) -> str:
    refs = f", {case.reference_images} reference images" if case.reference_images else ""
    return f"{case.model} ({case.weights} weights), {case.width}x{case.height}, {case.steps} steps{refs}"


@dataclass(frozen=True)
class _Memory:
    """One memory a setup must fit: the cap that emulates a smaller one, and the status of running out."""
    cap: Callable[[Case], float | None]
    out_of_memory: str
    cap_name: str


GPU = _Memory(vram_cap.AXIS.cap_gib, "oom", "an emulated cap")
HOST = _Memory(ram_cap.AXIS.cap_gib, "host_oom", "a RAM cap")


def _oom_caps(results: list[CaseResult], memory: _Memory) -> dict[str, float]:
    """Per setup, the largest cap (GiB) it ran out of that memory under: it needs more than that."""
    caps: dict[str, float] = {}
    for r in results:
        cap = memory.cap(r.case)
        if r.status == memory.out_of_memory and cap is not None:
            caps[setup_identity(r.case)] = max(cap, caps.get(setup_identity(r.case), 0.0))
    return caps


def _fit(result: CaseResult, size_gb: float, memory: _Memory, oom_caps: dict[str, float],
         peak: float | None, basis: str) -> str | None:
    """Why the finished case fits a memory of ``size_gb``, or None when it does not (or nothing says it does)."""
    size_gib = gb_to_gib(size_gb)
    if oom_caps.get(setup_identity(result.case), -1.0) >= size_gib:
        return None
    if peak is not None and peak <= size_gib:
        return f"{basis} {peak:.2f} GiB <= {size_gib:.2f} GiB"
    cap = memory.cap(result.case)
    if cap is not None and cap <= size_gib:
        return f"ran ok under {memory.cap_name} of {cap:g} GiB <= {size_gib:.2f} GiB"
    return None


def _gpu_fit(result: CaseResult, size_gb: float, oom_caps: dict[str, float]) -> str | None:
    return _fit(result, size_gb, GPU, oom_caps, *vram_needed(result))


def _ram_fit(result: CaseResult, size_gb: float, oom_caps: dict[str, float]) -> str | None:
    return _fit(result, size_gb, HOST, oom_caps, host_ram_needed(result), "RSS peak")


def drift_summary(result: CaseResult) -> str:
    if result.drift is None:
        return no_drift_reason(result)
    psnr = result.drift.metrics.get(PSNR)
    text = f"PSNR {psnr.value:.2f} dB" if psnr and psnr.value is not None else "PSNR n/a"
    return text + (f"; breaks {', '.join(result.drift.failed)}" if result.drift.failed else "")


def priced(name: str, gpu: str | None) -> bool:
    """Whether a ``--price`` name (a part of a GPU's name, e.g. H100) names this kind of card."""
    return gpu is None or name.lower() in gpu.lower()


def parse_prices(items: list[str]) -> dict[str, float]:
    """``--price GPU=USD_PER_HOUR`` values, one price per GPU name; ValueError names the first bad one."""
    prices: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name in prices:
            raise ValueError(f"--price {item!r}: {name} has a price already ({prices[name]:g} USD per hour); give "
                             "one each")
        try:
            prices[name] = float(value)
        except ValueError:
            raise ValueError(f"--price {item!r}: expected GPU=USD_PER_HOUR") from None
        if price_problem(name, prices[name]):
            raise ValueError(f"--price {item!r}: {price_problem(name, prices[name])}")
    return prices


def price_problem(name: str, usd_per_hour: float) -> str | None:
    if not name or not math.isfinite(usd_per_hour) or usd_per_hour < 0:
        return "a price is a GPU name and a finite, non-negative USD per hour"
    return None


def check_prices(prices: dict[str, float], kinds: list[str]) -> None:
    """Raises ValueError for a price that is not one, or of a GPU kind no case ran on: its cost would price another
    card's timings."""
    for name, usd in prices.items():
        if problem := price_problem(name, usd):
            raise ValueError(f"price {name}={usd!r}: {problem}")
        if not any(priced(name, kind) for kind in kinds):
            ran_on = ", ".join(kinds) if kinds else "no GPU (no case recorded one)"
            raise ValueError(f"--price {name}: no case of this run ran on such a GPU; its cases ran on {ran_on}")


def cost_column(name: str) -> str:
    return f"usd_per_1000_images_{name}"


THROUGHPUT_COLUMNS = ("throughput_setup", "throughput_batch", "images_per_hour_per_gpu")


def throughput_cost_column(name: str) -> str:
    return f"usd_per_1000_images_{name}_at_best_throughput"


def setup_label(case: Case) -> str:
    """What a card owner would set up: the case's label without the model and the emulated cap it ran under."""
    return changed(case, max_vram_gib=None).label.removeprefix(f"{case.model} ")


def text_encoder_place(case: Case) -> str:
    """Where the case's text encoder runs, which its memory peaks include or not."""
    if text_encoder.AXIS.precomputed(case):
        return "separate process (not in the peaks)"
    offload = offload_axis.AXIS.mode(case)
    return "in the pipeline" + ("" if offload == "none" else f", offload={offload}")


def _fits_row(resource: str, workload: str, size_gb: float, fitting: list[tuple[CaseResult, str]],
              prices: dict[str, float], name_card: bool) -> dict[str, Any]:
    row = {"resource": resource, "workload": workload, "size_gb": size_gb, "size_gib": gb_to_gib(size_gb)}
    if not fitting:
        return row | {"setup": NOTHING_FITS, "key": None, "s_per_call": None, "drift": None, "basis": None,
                      "model": None, "short_setup": None, "host_ram_gib": None, "text_encoder": None, "card": None,
                      "throughput_setup": None, "throughput_batch": None, "images_per_hour_per_gpu": None}
    # The fastest setup is the shortest wait for an image: the whole call, however many images it makes.
    best, basis = min(fitting, key=lambda pair: by_call_time(pair[0]))
    most = max((r for r, _ in fitting), key=images_per_hour_per_gpu)
    card = f" [on {best.setup.gpu}]" if name_card else ""  # timings of different cards side by side
    row |= {"setup": best.label + card, "key": best.key, "s_per_call": s_per_call(best),
            "drift": drift_summary(best), "basis": basis, "model": best.case.model,
            "short_setup": setup_label(best.case) + card, "host_ram_gib": host_ram_needed(best),
            "text_encoder": text_encoder_place(best.case), "card": best.setup.gpu,
            "throughput_setup": most.label + (f" [on {most.setup.gpu}]" if name_card else ""),
            "throughput_batch": most.batch_size, "images_per_hour_per_gpu": images_per_hour_per_gpu(most)}
    return row | {cost_column(name): usd_per_1000_images(best, usd) if priced(name, best.setup.gpu) else None
                  for name, usd in prices.items()} | {
        throughput_cost_column(name): usd_per_1000_images(most, usd) if priced(name, most.setup.gpu) else None
        for name, usd in prices.items()}


def fits_on(results: list[CaseResult], gpu_sizes_gb: Iterable[float] = GPU_SIZES_GB,
            host_ram_gb: Iterable[float] = HOST_RAM_GB, prices: dict[str, float] | None = None) -> pd.DataFrame:
    """Per workload and memory size, the fastest finished setup that fits, from measured peaks, caps and OOMs; with
    cases over several GPUs, per number of cards too (a setup over N GPUs fits N cards when each GPU's peak fits
    one card). In a run measured on several GPU models each answer names the one it was measured on."""
    prices = prices or {}
    name_card = len(measured_on(results)) > 1
    by_workload: dict[str, list[CaseResult]] = {}
    for r in results:
        by_workload.setdefault(workload_of(r.case), []).append(r)
    rows = []
    for workload, group in by_workload.items():
        oom_caps, host_oom_caps = _oom_caps(group, GPU), _oom_caps(group, HOST)
        finished = [r for r in group if r.status.ran and s_per_call(r) is not None]
        counts = sorted({gpus_of(r) for r in finished} | {1})
        for cards in counts:
            resource = "GPU" if counts == [1] else f"{cards} x GPU"
            usable = [r for r in finished if gpus_of(r) <= cards]
            for size in gpu_sizes_gb:
                fitting = [(r, basis) for r in usable if (basis := _gpu_fit(r, size, oom_caps))]
                rows.append(_fits_row(resource, workload, size, fitting, prices, name_card))
        for size in host_ram_gb:
            fitting = [(r, basis) for r in finished if (basis := _ram_fit(r, size, host_oom_caps))]
            rows.append(_fits_row("host RAM", workload, size, fitting, prices, name_card))
    columns = ["resource", "workload", "size_gb", "size_gib", "setup", "key", "s_per_call", "drift", "basis",
               "model", "short_setup", "host_ram_gib", "text_encoder", "card", *map(cost_column, prices)]
    if any(r.batch_size > 1 for r in results if r.status.ran):  # else the fastest setup is also the best throughput
        columns += [*THROUGHPUT_COLUMNS, *map(throughput_cost_column, prices)]
    return pd.DataFrame(rows, columns=columns)


def has_throughput(fits: pd.DataFrame) -> bool:
    """Whether the fits table answers the best throughput too (a run with a case of several images per call)."""
    return THROUGHPUT_COLUMNS[0] in fits.columns
