"""The live view of ``flux2bench run``: a progress bar with the stage of every running case, and one line per
finished case and per drift measurement."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from flux2bench.metrics import PHASES, PSNR, SSIM, peak, s_per_image, s_per_step
from flux2bench.results import CaseResult
from flux2bench.runner import RunProgress

STATUS_STYLE = {"ok": "green", "drift_fail": "yellow", "unsupported": "cyan"}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _peaks(result: CaseResult, name: str) -> str:
    """A memory metric's peak per phase, as the report's columns read it."""
    return "/".join(_fmt(peak(result, name, phase).value) for phase in PHASES)


def _case_line(result: CaseResult) -> str:
    style = STATUS_STYLE.get(result.status, "red")
    measured_vram = any(peak(result, "gpu_allocated_peak_gib", phase).value is not None for phase in PHASES)
    vram = f"VRAM allocated {_peaks(result, 'gpu_allocated_peak_gib')} GiB  " if measured_vram else ""
    detail = (result.reason or "")[:160] or (
        f"s/image {_fmt(s_per_image(result))}  s/step {_fmt(s_per_step(result), 3)}  peak {vram}"
        f"RAM {_peaks(result, 'host_rss_peak_gib')} GiB ({'/'.join(PHASES)})")
    return f"[{style}]{result.status:>11}[/]  {escape(f'{result.label}  {detail}')}"


def _drift_line(result: CaseResult) -> str:
    if result.status == "drift_fail":
        return _case_line(result)
    metrics = result.drift.metrics
    if result.drift.baseline_key is None:
        return f"[dim]      drift[/]  {escape(f'{result.label}  not measured: {metrics[PSNR].reason}')}"
    return "[dim]      drift[/]  " + escape(f"{result.label}  PSNR {_fmt(metrics[PSNR].value)} dB  "
                                        f"SSIM {_fmt(metrics[SSIM].value, 3)}  ({result.drift.label})")


class ProgressDisplay:
    """The live view of a run: a progress bar with the stage of every running case, and one line per finished
    case and per drift measurement."""

    COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())

    def __init__(self, expected: set[str], console: Console):
        self.expected = expected
        self.pending = frozenset(expected)  # the cases without a record when the run started
        self.running: dict[str, tuple[str, str]] = {}  # case key -> ("[gpu N] label", stage)
        self.progress = Progress(*self.COLUMNS, console=console, transient=False)
        self.task = self.progress.add_task("cases", total=len(expected))
        self.hooks = RunProgress(on_case_start=self.started, on_stage=self.staged, on_case_end=self.ended,
                                 on_drift=lambda result: self.print(_drift_line(result)),
                                 on_set_aside=lambda path, reason: self.print(
                                     "[yellow]invalid record set aside[/] "
                                     + escape(f"{path}: {reason}; its case runs again")),
                                 on_deferred=self.deferred,
                                 on_warning=lambda message: self.print(f"[yellow]warning:[/] {escape(message)}"))

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self.hooks

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def print(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def show(self) -> None:
        lines = [f"{escape(label)} [dim]({escape(stage)})[/]" for label, stage in self.running.values()]
        self.progress.update(self.task, description="\n".join(lines) or "cases")

    def started(self, case, device) -> None:
        if case.key not in self.expected:  # a bf16 baseline the drift step needs
            self.expected.add(case.key)
            self.progress.update(self.task, total=len(self.expected))
        self.running[case.key] = (f"{f'[gpu {device}] ' if device else ''}{case.label}", "starting")
        self.show()

    def staged(self, case, stage: str) -> None:
        if case.key in self.running:
            self.running[case.key] = (self.running[case.key][0], stage)
            self.show()

    def deferred(self, case, reason: str) -> None:
        self.print(f"[cyan]not run here[/] {escape(f'{case.label}: {reason}')}")
        self.progress.advance(self.task)

    def ended(self, result: CaseResult) -> None:
        self.running.pop(result.key, None)
        self.show()
        self.print(_case_line(result))
        self.progress.advance(self.task)
