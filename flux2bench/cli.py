"""The command line: a thin layer over the library (scenario, runner, report, compare, export)."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flux2bench import __version__
from flux2bench.axes.checkpoint import CACHE_ENV as CHECKPOINTS_ENV
from flux2bench.executors import ExecutorUnavailable, make_executor
from flux2bench.metrics import PHASES, PSNR, SSIM, peak
from flux2bench.outcome import EXIT_BAD_INPUT, EXIT_NOTHING_MEASURED, run_outcome
from flux2bench.results import CaseResult
from flux2bench.runner import Runner, RunProgress, resume_run, start_run
from flux2bench.scenario import MAX_CASES, ScenarioError, case_limit, load_cases
from flux2bench.store import RunDirError, RunStore

# Click's plain help never cuts an option name (rich's does, at 80 columns when output is not a terminal), and
# uses up to 120 columns where the terminal has them.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"max_content_width": 120})
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)

STATUS_STYLE = {"ok": "green", "drift_fail": "yellow", "unsupported": "cyan"}
MAX_CASES_HELP = "refuse a scenario that expands to more cases than this (counted before exclude rules)"


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"flux2bench {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    """Benchmark and memory-profile FLUX.2 pipelines: what each setup costs on this hardware."""


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _peaks(result: CaseResult, name: str) -> str:
    """A memory metric's peak per phase, as the report's columns read it."""
    return "/".join(_fmt(peak(result, name, phase).value) for phase in PHASES)


def _case_line(result: CaseResult) -> str:
    style = STATUS_STYLE.get(result.status, "red")
    detail = (result.reason or "")[:160] or (
        f"s/image {_fmt(result.s_per_image)}  s/step {_fmt(result.s_per_step, 3)}  peak "
        f"VRAM allocated {_peaks(result, 'gpu_allocated_peak_gib')} GiB  RAM {_peaks(result, 'host_rss_peak_gib')} GiB"
        f" ({'/'.join(PHASES)})")
    return f"[{style}]{result.status:>11}[/]  {result.label}  {detail}"


@app.command()
def plan(scenario: Optional[Path] = typer.Argument(None, help="scenario YAML file (omit with --resume)"),
         resume: Optional[Path] = typer.Option(None, help="run directory: show each of its cases' state, and what "
                                                          "run --resume would run"),
         block: list[str] = typer.Option([], help="only this block (repeatable), as run --block"),
         max_cases: int = typer.Option(MAX_CASES, min=1, help=MAX_CASES_HELP),
         keys: bool = typer.Option(False, "--keys", help="print only the case keys, one per line (for scripts, and "
                                                         "for report --timeline-case)")) -> None:
    """Print the cases a scenario expands to, without running them."""
    if (scenario is None) == (resume is None):
        raise fail("give a scenario file, or --resume RUN_DIR (not both)")
    try:
        statuses = {r.key: r.status for r in RunStore.open(resume).results()} if resume else {}
        cases = load_cases(resume / "scenario.yaml" if resume else scenario, block, max_cases=max_cases)
    except (ScenarioError, FileNotFoundError, RunDirError) as exc:
        raise fail(str(exc))
    if keys:
        print("\n".join(case.key for case in cases))
        return
    table = Table(title=f"{resume or scenario}: {len(cases)} case{'' if len(cases) == 1 else 's'}")
    for column in ("#", "block", "case"):
        table.add_column(column, overflow="fold")
    # A key is what --timeline-case and the records take: never cut, whatever the terminal's width.
    table.add_column("key", no_wrap=True, min_width=max((len(case.key) for case in cases), default=3))
    if resume:
        table.add_column("state", overflow="fold")
    for i, case in enumerate(cases, 1):
        state = [str(statuses.get(case.key, "to run"))] if resume else []
        table.add_row(str(i), case.block, case.label, case.key, *state)
    console.print(table)
    if resume:
        left = sum(case.key not in statuses for case in cases)
        console.print(f"{len(cases) - left} finished, {left} to run: flux2bench run --resume {resume}"
                      " (--retry-failed also reruns error, timeout and killed)", highlight=False)


def _drift_line(result: CaseResult) -> str:
    if result.status == "drift_fail":
        return _case_line(result)
    metrics = result.drift.metrics
    if result.drift.baseline_key is None:
        return f"[dim]      drift[/]  {result.label}  not measured: {metrics[PSNR].reason}"
    return (f"[dim]      drift[/]  {result.label}  PSNR {_fmt(metrics[PSNR].value)} dB  "
            f"SSIM {_fmt(metrics[SSIM].value, 3)}  ({result.drift.label})")


def _parse_devices(devices: Optional[str]) -> list[str] | None:
    if devices is None:
        return None
    values = [d.strip() for d in devices.split(",")]
    if not all(values) or len(set(values)) != len(values):
        raise fail(f"--devices {devices!r}: expected distinct comma-separated GPU indices or UUIDs, e.g. 0,1,2,3")
    return values


def _out_problem(out: Path) -> str | None:
    """Why no run directory can be made in ``out`` (created if missing), or None."""
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir():
        return f"--out {out}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: {existing} cannot be written"
    return None


class ProgressDisplay:
    """The live view of a run: a progress bar with the stage of every running case, and one line per finished
    case and per drift measurement."""

    COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())

    def __init__(self, expected: set[str]):
        self.expected = expected
        self.pending = frozenset(expected)  # the cases without a record when the run started
        self.running: dict[str, tuple[str, str]] = {}  # case key -> ("[gpu N] label", stage)
        self.progress = Progress(*self.COLUMNS, console=console, transient=False)
        self.task = self.progress.add_task("cases", total=len(expected))
        self.hooks = RunProgress(on_case_start=self.started, on_stage=self.staged, on_case_end=self.ended,
                                 on_drift=lambda result: self.print(_drift_line(result)),
                                 on_set_aside=lambda path, reason: self.print(
                                     f"[yellow]invalid record set aside[/] {path}: {reason}; its case runs again"),
                                 on_deferred=self.deferred)

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self.hooks

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def print(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def show(self) -> None:
        lines = [f"{label} [dim]({stage})[/]" for label, stage in self.running.values()]
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
        self.print(f"[cyan]not run here[/] {case.label}: {reason}")
        self.progress.advance(self.task)

    def ended(self, result: CaseResult) -> None:
        self.running.pop(result.key, None)
        self.show()
        self.print(_case_line(result))
        self.progress.advance(self.task)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is."""


@contextmanager
def _terminate_as_interrupt():
    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _open_run(scenario: Optional[Path], resume: Optional[Path], out: Path, block: list[str], max_cases: int):
    if (scenario is None) == (resume is None):
        raise fail("give a scenario file, or --resume RUN_DIR (not both)")
    if resume is None and (problem := _out_problem(out)):
        raise fail(problem)
    try:
        with case_limit(max_cases):
            return resume_run(resume, block) if resume else start_run(scenario, out_root=out, blocks=block)
    except (ScenarioError, RunDirError, FileNotFoundError, FileExistsError) as exc:
        raise fail(str(exc))
    except OSError as exc:
        raise fail(f"cannot write the run directory: {exc}")


def _gpu_change(meta: dict) -> str | None:
    """What a resume on another GPU model means, or None when the GPU model is the one the run was created on."""
    created = (meta.get("environment") or {}).get("gpu_name")
    now = (meta["resumed"][-1].get("environment") or {}).get("gpu_name")
    if created and now and created != now:
        return (f"this run was created on {created} and now runs on {now}: its cases will have been measured on "
                "two GPU models (the report says which ran each; compare refuses such a run)")
    return None


def _stopped(store, cases, signal_name: str) -> typer.Exit:
    finished = store.completed_keys() & {c.key for c in cases}
    errors.print(f"{signal_name}: stopped with {len(finished)} of {len(cases)} cases finished; the case that was "
                 f"running runs again on resume:\n  flux2bench run --resume {store.root}", highlight=False)
    return typer.Exit(130 if signal_name == "interrupted" else 143)


@app.command(epilog="Exit code: 0 when every case has a result and none failed; 1 when a case failed (error, "
                    "timeout, killed, drift_fail; oom and unsupported are results); 3 when nothing was measured "
                    "(every case unsupported); 2 on bad input, before anything runs; 130 or 143 when stopped by "
                    "Ctrl-C or SIGTERM (resume later).")
def run(
    scenario: Optional[Path] = typer.Argument(None, help="scenario YAML file (omit with --resume)"),
    out: Path = typer.Option(Path("runs"), help="folder that receives the new run directory"),
    resume: Optional[Path] = typer.Option(None, help="run directory to continue; finished cases are skipped"),
    retry_failed: bool = typer.Option(False, help="with --resume, run again the cases that ended error, timeout "
                                                  "or killed"),
    drift_only: bool = typer.Option(False, help="with --resume, run nothing: attach drift to finished cases that "
                                                "lack it (after bringing the images of a run made in parts together)"),
    report: bool = typer.Option(True, help="write the report when the run ends"),
    block: list[str] = typer.Option([], help="run only this block (repeatable); --resume runs the rest later"),
    devices: Optional[str] = typer.Option(
        None, help="GPUs to spread cases over, one case per GPU at a time (CUDA_VISIBLE_DEVICES values, e.g. 0,1,2,3); "
                   "a case over N GPUs holds N of them; cases then share the host's CPU, RAM and PCIe bandwidth"),
    max_cases: int = typer.Option(MAX_CASES, min=1, help=MAX_CASES_HELP),
    checkpoints: Optional[Path] = typer.Option(
        None, help="folder of the on-disk checkpoints of weights: checkpoint (default: $FLUX2BENCH_CHECKPOINTS, "
                   "else ~/.cache/flux2bench/checkpoints)"),
    executor: str = typer.Option("local", help="where cases run: local (this host, over --devices) or ray (the "
                                               "nodes of a Ray cluster; pip install 'flux2bench[ray]')"),
    address: Optional[str] = typer.Option(None, help="with --executor ray: the cluster to join (auto: the running "
                                                     "one; default: start a local Ray instance)"),
) -> None:
    """Run every case of a scenario, each in its own process.

    Each case's result is stored in the run directory as it finishes; then the report is written."""
    slots = _parse_devices(devices)
    try:
        placer = make_executor(executor, slots, address)
    except ExecutorUnavailable as exc:
        raise fail(str(exc))
    if checkpoints is not None:
        os.environ[CHECKPOINTS_ENV] = str(checkpoints.resolve())  # the workers inherit it
    store, cases = _open_run(scenario, resume, out, block, max_cases)
    where = f", {len(slots)} at a time on GPUs {devices}" if slots else ""
    where += f", on Ray ({address or 'a local instance'})" if executor == "ray" else ""
    console.print(f"run directory: [bold]{store.root}[/]  ({len(cases)} cases{where})")
    if resume and (change := _gpu_change(store.meta)):
        errors.print(f"[yellow]warning:[/] {change}", highlight=False)
    display = ProgressDisplay({c.key for c in cases} - store.completed_keys())
    try:
        with _terminate_as_interrupt(), display as hooks:
            Runner(store, progress=hooks, retry_failed=retry_failed, executor=placer).run(cases,
                                                                                          measure=not drift_only)
    except (RunDirError, ExecutorUnavailable) as exc:
        raise fail(str(exc))
    except KeyboardInterrupt as exc:
        raise _stopped(store, cases, "terminated" if isinstance(exc, Terminated) else "interrupted")
    if display.hooks.skipped:
        console.print(f"skipped {len(display.hooks.skipped)} finished case(s) (--resume)")
    if deferred := display.hooks.deferred:
        console.print(f"{len(deferred)} case{'s' if len(deferred) != 1 else ''} not run on this machine (see above); "
                      f"they run on: flux2bench run --resume {store.root}", highlight=False)
        if deferred.keys() >= display.pending:
            raise fail("this machine cannot run any of the remaining cases; nothing was recorded",
                       EXIT_NOTHING_MEASURED)
    outcome = run_outcome([c.key for c in cases], store.results())
    console.print(outcome.summary(), highlight=False)
    if report:
        from flux2bench.report import build_report

        built = build_report(store.root)
        console.print(f"report: {built.html} and {built.markdown}", highlight=False)
    raise typer.Exit(outcome.exit_code)


@app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help="run directory"),
    against: Optional[Path] = typer.Option(None, "--against", "--baseline",
                                           help="another run directory to show each measured cell's change against "
                                                "(--baseline is its earlier name)"),
    price: list[str] = typer.Option([], help="GPU=USD_PER_HOUR, e.g. H100=2.5 (repeatable); GPU names a kind of card "
                                             "the run's cases ran on (a part of its name, e.g. H100)"),
    timeline_case: Optional[str] = typer.Option(None, help="case key whose memory timeline is plotted"),
) -> None:
    """Write report.md, report.csv, report.html and plots into RUN_DIR, and print a short summary."""
    from flux2bench.report import build_report, summary_lines

    prices = {}
    for item in price:
        name, _, value = item.partition("=")
        try:
            prices[name] = float(value)
        except ValueError:
            raise fail(f"--price {item!r}: expected GPU=USD_PER_HOUR")
    try:
        built = build_report(run_dir, other_run_dir=against, prices=prices or None, timeline_case=timeline_case)
    except (FileNotFoundError, RunDirError) as exc:
        raise fail(str(exc))
    except ValueError as exc:  # e.g. a --timeline-case that names no case
        raise fail(str(exc))
    console.print("\n".join(summary_lines(built.answers)), markup=False, highlight=False)
    console.print(f"report written to {built.html} (open it in a browser), {built.markdown} and {built.csv}",
                  highlight=False)


def _write_output(option: str, path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise fail(f"{option} {path}: cannot write: {exc.strerror or exc}")


@app.command()
def compare(
    baseline: Path = typer.Argument(..., help="baseline run directory"),
    current: Path = typer.Argument(..., help="current run directory"),
    rules: Optional[Path] = typer.Option(None, help="gate.yaml with thresholds and per-block overrides"),
    allow_env_change: bool = typer.Option(False, help="compare although driver or library versions differ"),
    fail_on_improvement: bool = typer.Option(False, help="also fail on unexplained large improvements"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the JSON verdict here"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="write the Markdown summary here"),
) -> None:
    """Compare two runs, case by case; the exit code gates regressions.

    Exit code: 0 on pass, 1 on a regression, 2 on bad input."""
    from flux2bench.compare import CompareError, compare_runs, load_rules

    try:
        verdict = compare_runs(baseline, current, rules=load_rules(rules) if rules else None,
                               allow_env_change=allow_env_change, fail_on_improvement=fail_on_improvement)
    except (CompareError, RunDirError) as exc:
        raise fail(str(exc))
    markdown = verdict.markdown()
    if json_out:
        _write_output("--json", json_out, verdict.to_json())
    if markdown_out:
        _write_output("--markdown", markdown_out, markdown)
    console.print(markdown, markup=False, highlight=False)
    raise typer.Exit(verdict.exit_code)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="run directory"),
    format: str = typer.Option("pytest-benchmark", help="output format (pytest-benchmark)"),
    output: Optional[Path] = typer.Option(None, help="output file (default: RUN_DIR/pytest-benchmark.json)"),
) -> None:
    """Export a run in another tool's format."""
    from flux2bench.export import write_pytest_benchmark

    if format != "pytest-benchmark":
        raise fail(f"unknown format {format!r}; supported: pytest-benchmark")
    output = output or run_dir / "pytest-benchmark.json"
    try:
        path = write_pytest_benchmark(run_dir, output)
    except (FileNotFoundError, RunDirError) as exc:
        raise fail(str(exc))
    except OSError as exc:
        raise fail(f"--output {output}: cannot write: {exc.strerror or exc}")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    app()
