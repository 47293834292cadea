"""The report's "Why" section: for each profiled case, where a denoising step goes and what holds the memory peak.

Two stacked bars per run (the step by category, the peak by owner with the card sizes drawn as lines), then per case
the tables behind them, the largest allocations at the peak and links to the saved trace and allocator snapshot. A
run without profiles has no Why section. The section is built once as blocks and rendered both as Markdown and HTML.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from flux2bench.metrics import BY_NAME, peak
from flux2bench.profiling.record import PeakMemory, Profile, StepTime
from flux2bench.report.fits import GPU_SIZES_GB, gb_to_gib
from flux2bench.results import CaseResult
from flux2bench.safe_files import replacing

TITLE = "Why each setup costs what it costs"
TRACE_VIEWER = "https://ui.perfetto.dev"
SNAPSHOT_VIEWER = "https://pytorch.org/memory_viz"
GROUP_COLOURS = {"matmul": "C0", "attention": "C1", "quantize": "C2", "elementwise": "C4", "other": "C7",
                 "communication": "C5", "copy": "C3", "idle": "lightgray"}
PART_COLOURS = {"weights": "C0", "allocated": "C1", "slack": "C8", "reserved_later": "C9", "outside": "C7",
                "not_attributed": "black"}


@dataclass
class Block:
    """One piece of the section: a heading, a paragraph, a table or an image."""

    kind: str  # "h3", "p", "table", "img"
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None


@dataclass
class Why:
    blocks: list[Block]
    paths: dict[str, Path]  # the plots drawn

    def markdown(self) -> list[str]:
        lines = [f"## {TITLE}", ""]
        for block in self.blocks:
            if block.kind == "table":
                lines += ["| " + " | ".join(block.headers) + " |", "|" + "---|" * len(block.headers)]
                lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in block.rows]
            elif block.kind == "img" and block.path is not None:
                lines.append(f"![{block.text}](plots/{block.path.name})")
            else:
                lines.append(f"### {block.text}" if block.kind == "h3" else block.text)
            lines.append("")
        return lines

    def html(self, image_uri: Any) -> str:
        parts = [f"<h2>{html.escape(TITLE)}</h2>"]
        for block in self.blocks:
            if block.kind == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
                body = "".join("<tr>" + "".join(f'<td class="text">{html.escape(c)}</td>' for c in row) + "</tr>"
                               for row in block.rows)
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
            elif block.kind == "img" and block.path is not None:
                parts.append(f'<figure><img src="{image_uri(block.path)}" alt="{html.escape(block.text)}">'
                             f"<figcaption>{html.escape(block.text)}</figcaption></figure>")
            elif block.kind == "h3":
                parts.append(f"<h3>{html.escape(block.text)}</h3>")
            else:
                parts.append(f"<p>{_html_links(block.text)}</p>")
        return "\n".join(parts)


def _html_links(text: str) -> str:
    """A paragraph with its Markdown links ``[name](target)`` as HTML links."""
    import re

    escaped = html.escape(text)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{m.group(2)}">{m.group(1)}</a>', escaped)


def profiled(results: list[CaseResult]) -> list[CaseResult]:
    return [r for r in results if r.profile is not None]


def build_why(run_dir: Path, results: list[CaseResult], numbers: dict[str, int], meta: dict[str, Any],
              draw: bool = True) -> Why | None:
    """The Why section of a run, or None when no case was profiled."""
    cases = profiled(results)
    if not cases:
        return None
    names = [f"#{numbers.get(r.key, '?')} {r.label}" for r in cases]
    paths = _draw(run_dir / "plots", cases, [name.split()[0] for name in names]) if draw else {}
    blocks = [Block("p", INTRO)] + [Block("img", title, path=paths[name]) for name, title in PLOT_TITLES.items()
                                    if name in paths]
    pinned = ((meta.get("environment") or {}).get("host_to_device") or {}).get("pinned_gib_s")
    for result, name in zip(cases, names):
        blocks += case_blocks(result, name, pinned)
    return Why(blocks, paths)


INTRO = ("Each profiled case made extra calls after its timed ones, outside the inference phase's memory tracker: "
         "the timed numbers and the peaks of the results table were measured without the profiler. The step's time "
         "is split into categories that add up to the profiled step with idle (an instant where several run counts "
         "for the first: compute, then communication, then copies); the peak into owners that add up to the "
         "device-level peak of the profiled call. How each part is computed: docs/why.md.")
PLOT_TITLES = {"why_step": "Where a denoising step goes (profiled step, ms; cases numbered as in Results)",
               "why_peak": "What holds the peak (profiled call, GiB; dotted lines: card sizes)"}


def case_blocks(result: CaseResult, name: str, pinned_gib_s: float | None) -> list[Block]:
    profile = result.profile
    assert profile is not None
    blocks = [Block("h3", name)]
    blocks += step_blocks(result, profile, pinned_gib_s)
    blocks += peak_blocks(result, profile)
    blocks += load_blocks(profile)
    return blocks


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole > 0 else "n/a"


def step_blocks(result: CaseResult, profile: Profile, pinned_gib_s: float | None) -> list[Block]:
    step = profile.step
    if step is None:
        return [Block("p", f"Step: not profiled ({profile.step_reason}).")]
    timed = BY_NAME["s_per_step"].value(result)
    where = "GPU kernels and copies" if step.activity == "cuda" else "CPU operators (no CUDA)"
    text = (f"Step {step.step_index + 1} of {result.case.steps}, profiled: {step.step_ms:.1f} ms ({where}); the timed "
            f"steps, without the profiler: median {timed * 1e3:.1f} ms." if timed else
            f"Step {step.step_index + 1}, profiled: {step.step_ms:.1f} ms ({where}).")
    rows = [[c.name, f"{c.ms:.2f}", _pct(c.ms, step.step_ms), f"{c.busy_ms:.2f}", str(c.items),
             _copy_rate(c.gib_per_s, pinned_gib_s)] for c in step.categories]
    blocks = [Block("p", text + _trace_link(step)),
              Block("table", headers=["category", "ms in the step", "% of step", "busy ms (with overlap)", "items",
                                      "copies: GiB/s"], rows=rows)]
    if step.rates:
        blocks.append(Block("table", headers=["achieved", "TFLOP in the step", "busy ms", "TFLOP/s", "% of dense peak"],
                            rows=[[rate.group, f"{rate.tflop:.3g}", f"{rate.busy_ms:.2f}", f"{rate.tflops:.0f}",
                                   _pct(rate.tflops, rate.peak_tflops) if rate.peak_tflops else
                                   f"n/a ({rate.peak_reason})"] for rate in step.rates]))
    elif step.flops_reason:
        blocks.append(Block("p", f"No achieved TFLOP/s: {step.flops_reason}."))
    return blocks


def _copy_rate(gib_per_s: float | None, pinned_gib_s: float | None) -> str:
    if gib_per_s is None:
        return ""
    if not pinned_gib_s:
        return f"{gib_per_s:.1f} (no host bandwidth measured in run.json)"
    return f"{gib_per_s:.1f} ({_pct(gib_per_s, pinned_gib_s)} of the host's pinned {pinned_gib_s:.1f})"


def _trace_link(step: StepTime) -> str:
    if step.trace is None:
        return f" No trace saved: {step.trace_reason}."
    return f" Trace: [{step.trace}]({step.trace}) (opens in {TRACE_VIEWER})."


def peak_blocks(result: CaseResult, profile: Profile) -> list[Block]:
    memory = profile.memory
    if memory is None:
        return [Block("p", f"Peak: not profiled ({profile.memory_reason}).")]
    recorded = peak(result, "gpu_device_peak_gib", "inference")
    text = (f"Peak of the profiled call: {memory.total_gib:.2f} GiB ({memory.total_basis}); the inference phase's "
            f"recorded device peak, without profiling: "
            + (f"{recorded.value:.2f} GiB" if recorded.value is not None else f"n/a ({recorded.reason})")
            + f". Allocator: {memory.allocated_peak_gib:.2f} GiB allocated at its peak (its history replays to "
            f"{memory.replayed_allocated_peak_gib:.2f}), {memory.reserved_peak_gib:.2f} GiB reserved."
            + _snapshot_link(memory))
    rows = [[part.name, f"{part.gib:.3f}", _pct(part.gib, memory.total_gib)] for part in memory.parts]
    blocks = [Block("p", text), Block("table", headers=["owner", "GiB", "% of peak"], rows=rows)]
    if memory.top:
        blocks.append(Block("table", headers=["largest live allocations at the peak", "GiB", "count", "module"],
                            rows=[[a.made_by, f"{a.gib:.3f}", str(a.count),
                                   a.module or a.component or ""] for a in memory.top]))
    if memory.module_reason:
        blocks.append(Block("p", f"Modules are not named: {memory.module_reason}."))
    return blocks


def _snapshot_link(memory: PeakMemory) -> str:
    if memory.snapshot is None:
        return f" No allocator snapshot saved: {memory.snapshot_reason}."
    return f" Allocator snapshot: [{memory.snapshot}]({memory.snapshot}) (opens in {SNAPSHOT_VIEWER})."


def load_blocks(profile: Profile) -> list[Block]:
    load = profile.load
    if load is None:
        return [Block("p", f"Load: {profile.load_reason}.")]
    text = f"Load: {load.weights_gib:.2f} GiB of weights resident when the profile started"
    if load.allocated_peak_gib is None:
        text += "; the load phase's allocator peak is not in the record"
    elif load.transient_gib is None:
        text += (f"; the load phase's allocator peak was {load.allocated_peak_gib:.2f} GiB, below them: the weights "
                 "moved onto the GPU after the load")
    else:
        text += (f"; the load phase's allocator peak was {load.allocated_peak_gib:.2f} GiB, {load.transient_gib:.2f} "
                 "GiB of it transient")
    return [Block("p", f"{text}. Method: {load.method}."),
            Block("table", headers=["weights resident", "GiB"],
                  rows=[[part.name, f"{part.gib:.3f}"] for part in load.weights])]


def _draw(folder: Path, cases: list[CaseResult], names: list[str]) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    paths = {}
    steps = [(n, r.profile.step) for n, r in zip(names, cases) if r.profile and r.profile.step]
    if steps:
        paths["why_step"] = _bars(folder / "why_step.png", steps, lambda s: [(c.group, c.name, c.ms)
                                                                           for c in s.categories],
                                  GROUP_COLOURS, "ms per denoising step (profiled step)", PLOT_TITLES["why_step"])
    peaks = [(n, r.profile.memory) for n, r in zip(names, cases) if r.profile and r.profile.memory]
    if peaks:
        top = max(m.total_gib for _, m in peaks)
        cards = [(size, gb_to_gib(size)) for size in GPU_SIZES_GB if gb_to_gib(size) <= max(top * 1.3, 12)]
        paths["why_peak"] = _bars(folder / "why_peak.png", peaks, lambda m: [(p.kind, p.name, p.gib)
                                                                           for p in m.parts],
                                  PART_COLOURS, "GiB at the peak of the profiled call", PLOT_TITLES["why_peak"], cards)
    return paths


def _bars(path: Path, rows: list[tuple[str, Any]], segments: Any, colours: dict[str, str], xlabel: str, title: str,
          cards: list[tuple[float, float]] | None = None) -> Path:
    """One horizontal bar per case, stacked from its (colour key, label, width) segments in the order of the colour
    keys (weights before activations, matrix products before copies), each label in a shade of its key's colour and
    in the same place in every bar; labels no bar holds 0.1% of the widest bar of are left out (the tables have
    them)."""
    widths = {label: np.zeros(len(rows)) for _, item in rows for _, label, _ in segments(item)}
    keys = {label: key for _, item in rows for key, label, _ in segments(item)}
    for index, (_, item) in enumerate(rows):
        for _, label, width in segments(item):
            widths[label][index] += width
    widest = max(sum(w[index] for w in widths.values()) for index in range(len(rows)))
    order = list(colours)
    labels = sorted((label for label in widths if widths[label].max() >= 0.001 * widest),
                    key=lambda label: order.index(keys[label]) if keys[label] in order else len(order))
    figure = Figure(figsize=(9, 2.5 + 0.4 * len(rows) + 0.18 * len(labels)))
    ax = figure.add_subplot()
    left = np.zeros(len(rows))
    for label in labels:
        same_key = [other for other in labels if keys[other] == keys[label]]
        lighter = 0.7 * same_key.index(label) / max(len(same_key) - 1, 1)
        colour = to_rgb(colours.get(keys[label], "C6"))
        ax.barh([name for name, _ in rows], widths[label], left=left, label=label,
                color=tuple(c + (1 - c) * lighter for c in colour), edgecolor="white", linewidth=0.5)
        left += widths[label]
    for size_gb, size_gib in cards or []:
        ax.axvline(size_gib, color="black", linestyle=":", linewidth=1)
        ax.annotate(f"{size_gb:g} GB", (size_gib, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                    rotation=90, va="top", ha="right")
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    figure.tight_layout()
    with replacing(path) as png:
        figure.savefig(png, format="png", dpi=100)
    return path
