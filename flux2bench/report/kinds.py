"""The purchase question across GPU kinds: in a run measured on several kinds of card (a Ray cluster of H100, H200
and L40S nodes, say), each kind's fastest setup per workload side by side, with its s/image, peak VRAM, energy and,
with ``--price KIND=USD_PER_HOUR``, its cost per 1000 images; and a plot of the same."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from flux2bench.metrics import (BY_NAME, LARGER, by_call_time, s_per_call, s_per_image, usd_per_1000_images,
                                vram_needed)
from flux2bench.report.fits import priced, setup_label, workload_of
from flux2bench.report.frame import gpus_of
from flux2bench.results import CaseResult, measured_on
from flux2bench.safe_files import replacing

TITLE = "GPU kinds side by side"
S_PER_IMAGE = BY_NAME["s_per_image"].header


def fastest_per_kind(results: list[CaseResult]) -> dict[str, dict[str, CaseResult]]:
    """Per workload, per GPU model (as its driver names it), the case that ran to the end with the shortest wait
    for an image; empty unless the run was measured on several GPU models."""
    finished = [r for r in results if r.status.ran and s_per_call(r) is not None and r.setup.gpu]
    if len(measured_on(finished)) < 2:
        return {}
    best: dict[str, dict[str, CaseResult]] = {}
    for r in finished:
        on_kind = best.setdefault(workload_of(r.case), {})
        current = on_kind.get(r.setup.gpu)
        if current is None or by_call_time(r) < by_call_time(current):
            on_kind[r.setup.gpu] = r
    return best


def cost_per_1000_images(result: CaseResult, prices: dict[str, float]) -> float | None:
    """USD per 1000 images at the price of the card the case ran on (every GPU of the case paid), or None."""
    usd = next((usd for name, usd in prices.items() if priced(name, result.setup.gpu)), None)
    return None if usd is None else usd_per_1000_images(result, usd)


def kinds_rows(results: list[CaseResult], prices: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    headers = ["workload", "GPU", "fastest setup", "GPUs", S_PER_IMAGE, f"peak VRAM per GPU GiB ({LARGER})",
               "GPU energy J/image", "USD per 1000 images"]
    energy = BY_NAME["energy_j"]
    rows = []
    for workload, on_kinds in fastest_per_kind(results).items():
        for gpu, r in sorted(on_kinds.items(), key=lambda item: by_call_time(item[1])):
            vram, joules, cost = vram_needed(r)[0], energy.value(r), cost_per_1000_images(r, prices)
            image = s_per_image(r)
            rows.append([workload, gpu, setup_label(r.case), str(gpus_of(r)),
                         "n/a" if image is None else f"{image:.2f}",
                         "n/a" if vram is None else f"{vram:.2f}", "n/a" if joules is None else f"{joules:.0f}",
                         "no --price for this GPU" if cost is None else f"{cost:.2f}"])
    return headers, rows


def plot_kinds(results: list[CaseResult], path: Path) -> str | None:
    """s/image and energy per image of each kind's fastest setup, one panel pair per workload."""
    best = fastest_per_kind(results)
    if not best:
        return "the run was measured on one GPU model"
    figure = Figure(figsize=(9, 1.8 + 2.6 * len(best)))
    energy = BY_NAME["energy_j"]
    for row, (workload, on_kinds) in enumerate(best.items()):
        kinds = sorted(on_kinds, key=lambda gpu: by_call_time(on_kinds[gpu]))
        for column, (label, values) in enumerate((
                (S_PER_IMAGE, [s_per_image(on_kinds[gpu]) or 0.0 for gpu in kinds]),
                ("GPU energy J/image", [energy.value(on_kinds[gpu]) or 0.0 for gpu in kinds]))):
            ax = figure.add_subplot(len(best), 2, 2 * row + column + 1)
            ax.barh(kinds, values)
            ax.invert_yaxis()
            ax.set(xlabel=label, title=workload if column == 0 else "")
            ax.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    with replacing(path) as png:
        figure.savefig(png, format="png", dpi=110)
    return None
