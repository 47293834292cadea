"""The command line: a thin layer over the library (scenario, runner, report, compare, export)."""

from __future__ import annotations

import math
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flux2bench import __version__
from flux2bench.artifact_cache import ENV as CACHE_ENV, ArtifactCache, cache_root
from flux2bench.axes.checkpoint import CACHE_ENV as CHECKPOINTS_ENV
from flux2bench.crash import GuardedGroup, environment_problem
from flux2bench.executors import ExecutorUnavailable, make_executor
from flux2bench.fork_server import DEFAULT_START, START_METHODS, StartMethod, forks_workers, shared_server
from flux2bench.outcome import EXIT_BAD_INPUT, EXIT_NOTHING_MEASURED, machine_lacks_every_case, run_outcome
from flux2bench.profiling import profiled
from flux2bench.progress_display import ProgressDisplay
from flux2bench.runner import Runner, resume_run, start_run
from flux2bench.scenario import MAX_CASES, ScenarioError, case_limit, load_cases
from flux2bench.store import RunDirError, RunStore
from flux2bench.trackers.environment import HOST_LABEL_ENV

# Click's plain help never cuts an option name (rich's does, at 80 columns when output is not a terminal), and
# uses up to 120 columns where the terminal has them.
app = typer.Typer(cls=GuardedGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"max_content_width": 120})
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)

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


def _parse_devices(devices: Optional[str]) -> list[str] | None:
    if devices is None:
        return None
    values = [d.strip() for d in devices.split(",")]
    if not all(values) or len(set(values)) != len(values):
        raise fail(f"--devices {devices!r}: expected distinct comma-separated GPU indices or UUIDs, e.g. 0,1,2,3")
    import torch

    visible = torch.cuda.device_count()
    if visible == 0:
        raise fail(f"--devices {devices}: this machine has no GPU that CUDA can see; run without --devices")
    beyond = [v for v in values if v.isdigit() and int(v) >= visible]
    if beyond and "CUDA_VISIBLE_DEVICES" not in os.environ:
        raise fail(f"--devices {devices}: GPU {', '.join(beyond)} does not exist; this machine has {visible} "
                   f"(0 to {visible - 1})")
    return values


def _out_problem(out: Path) -> str | None:
    """Why no run directory can be made in ``out`` (created if missing), or None."""
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir():
        return f"--out {out}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: {existing} cannot be written"
    return None


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


def _open_run(scenario: Optional[Path], resume: Optional[Path], out: Path, block: list[str], max_cases: int,
              on_valid: Callable[[], None] = lambda: None):
    """The run directory and its cases; ``on_valid`` is called once the input is known to be good, before the
    environment capture (a few seconds) of a new run."""
    if (scenario is None) == (resume is None):
        raise fail("give a scenario file, or --resume RUN_DIR (not both)")
    if resume is None and (problem := _out_problem(out)):
        raise fail(problem)
    try:
        with case_limit(max_cases):
            if resume:
                opened = resume_run(resume, block)
                on_valid()
                return opened
            load_cases(scenario, block)
            on_valid()
            return start_run(scenario, out_root=out, blocks=block)
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
                    "(every case unsupported, or this machine lacks what every case left needs); 2 on bad input or "
                    "an unusable run directory; 4 on an internal error (with a log); 130 or 143 when stopped by "
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
    host_label: Optional[str] = typer.Option(None, help="a name for this machine, recorded with the run: compare "
                                                        "treats runs of one label as one host"),
    checkpoints: Optional[Path] = typer.Option(
        None, help="folder of the on-disk checkpoints of weights: checkpoint (default: $FLUX2BENCH_CHECKPOINTS, "
                   "else ~/.cache/flux2bench/checkpoints)"),
    cache: Optional[Path] = typer.Option(
        None, help=f"folder that keeps prompt embeddings and checkpoints across runs, keyed by content and library "
                   f"versions (default: ${CACHE_ENV}; none when unset); with --executor ray, each node keeps its own "
                   "cache at this path"),
    executor: str = typer.Option("local", help="where cases run: local (this host, over --devices) or ray (the "
                                               "nodes of a Ray cluster; pip install 'flux2bench[ray]')"),
    address: Optional[str] = typer.Option(None, help="with --executor ray: the cluster to join (auto: the running "
                                                     "one; default: start a local Ray instance)"),
    worker_start: str = typer.Option(DEFAULT_START, help="how each case's process starts: fork-server (forked after "
                                     "one import of torch and diffusers per run, before any CUDA call) or fresh (a new "
                                     "interpreter each; always so under a RAM cap and with --executor ray)"),
    profile: bool = typer.Option(False, "--profile", help="profile every case this run runs, on extra calls after its "
                                                          "timed ones: what holds the peak, where a step goes "
                                                          "(docs/why.md); as the scenario field profile: true"),
) -> None:
    """Run every case of a scenario, each in its own process.

    Each case's result is stored in the run directory as it finishes; then the report is written."""
    for given, option in ((drift_only, "--drift-only"), (retry_failed, "--retry-failed")):
        if given and resume is None:
            raise fail(f"{option} continues a run: give it with --resume RUN_DIR")
    slots = _parse_devices(devices)
    if worker_start not in START_METHODS:
        raise fail(f"--worker-start must be one of {', '.join(START_METHODS)}, not {worker_start!r}")
    if host_label is not None:
        os.environ[HOST_LABEL_ENV] = host_label  # capture_environment records it in run.json
    try:
        placer = make_executor(executor, slots, address)
    except ExecutorUnavailable as exc:
        raise fail(str(exc))
    if checkpoints is not None:
        os.environ[CHECKPOINTS_ENV] = str(checkpoints.resolve())  # the workers inherit it
    cache_dir = cache_root(cache)
    for folder, option in ((cache_dir, "--cache"), (checkpoints, "--checkpoints")):
        if folder is not None and (problem := _out_problem(Path(folder))):
            raise fail(problem.replace("--out", option, 1))
    forks = forks_workers(worker_start, executor, drift_only)
    # the fork server's imports overlap the run directory's set-up (the environment capture); `flux2bench run`
    # started it already, before this module's imports (flux2bench.__main__)
    store, cases = _open_run(scenario, resume, out, block, max_cases,
                             on_valid=shared_server().start if forks else lambda: None)
    cases = profiled(cases) if profile else cases
    if report:  # imported while the first worker starts, which takes longer, rather than after the last case
        import flux2bench.report  # noqa: F401
    where = f", {len(slots)} at a time on GPUs {devices}" if slots else ""
    where += f", on Ray ({address or 'a local instance'})" if executor == "ray" else ""
    console.print(f"run directory: [bold]{store.root}[/]  ({len(cases)} cases{where})")
    if resume and (change := _gpu_change(store.meta)):
        errors.print(f"[yellow]warning:[/] {change}", highlight=False)
    display = ProgressDisplay({c.key for c in cases} - store.completed_keys(), console)
    try:
        with _terminate_as_interrupt(), display as hooks:
            measured = Runner(store, progress=hooks, retry_failed=retry_failed, executor=placer,
                              cache=ArtifactCache(cache_dir) if cache_dir else None,
                              worker_start=cast(StartMethod, worker_start)).run(cases, measure=not drift_only)
    except (RunDirError, ExecutorUnavailable) as exc:
        raise fail(str(exc))
    except OSError as exc:  # e.g. a full disk: the records written so far are intact
        raise fail(f"cannot write to the run directory: {environment_problem(exc)}; the records written so far "
                   f"are intact: flux2bench run --resume {store.root}")
    except KeyboardInterrupt as exc:
        raise _stopped(store, cases, "terminated" if isinstance(exc, Terminated) else "interrupted")
    if display.hooks.skipped:
        console.print(f"skipped {len(display.hooks.skipped)} finished case(s) (--resume)")
    deferred = display.hooks.deferred
    if deferred:
        console.print(f"{len(deferred)} case{'s' if len(deferred) != 1 else ''} not run on this machine (see above); "
                      f"they run on: flux2bench run --resume {store.root}", highlight=False)
    outcome = run_outcome([c.key for c in cases], store.results())
    console.print(outcome.summary(), highlight=False)
    if report:
        _write_run_report(store.root)
    if lacks := machine_lacks_every_case(measured, deferred):
        errors.print(f"[bold red]error:[/] this machine cannot run any of the remaining cases ({lacks}); none is a "
                     f"result about its setup, and each runs again with flux2bench run --resume {store.root} on a "
                     "machine that has what it needs", highlight=False)
        raise typer.Exit(EXIT_NOTHING_MEASURED)
    raise typer.Exit(outcome.exit_code)


def _write_run_report(run_dir: Path) -> None:
    """The report at the end of a run; one that cannot be written does not change the run's exit code."""
    from flux2bench.report import build_report

    try:
        built = build_report(run_dir)
    except OSError as exc:
        errors.print(f"[bold red]error:[/] the report could not be written ({environment_problem(exc)}); the "
                     f"records are intact: write it later with flux2bench report {run_dir}", highlight=False)
        return
    console.print(f"report: {built.html} and {built.markdown}", highlight=False)


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
        if not name or not math.isfinite(prices[name]) or prices[name] < 0:
            raise fail(f"--price {item!r}: a price is a GPU name and a finite, non-negative USD per hour")
    try:
        built = build_report(run_dir, other_run_dir=against, prices=prices or None, timeline_case=timeline_case)
    except (FileNotFoundError, RunDirError) as exc:
        raise fail(str(exc))
    except ValueError as exc:  # e.g. a --timeline-case that names no case
        raise fail(str(exc))
    console.print("\n".join(summary_lines(built.answers)), markup=False, highlight=False)
    console.print(f"report written to {built.html} (open it in a browser), {built.markdown} and {built.csv}",
                  highlight=False)


def _refuse_run_file(option: str, path: Path, *run_dirs: Path, own: Path | None = None) -> None:
    """A command writes no file of a run directory but its own (``own``): not run.json, not a record."""
    for run_dir in run_dirs:
        if path.resolve() != (own.resolve() if own else None) and RunStore(run_dir).owns(path):
            raise fail(f"{option} {path}: is a file of the run directory {run_dir}; write elsewhere")


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

    for option, path in (("--json", json_out), ("--markdown", markdown_out)):
        if path is not None:
            _refuse_run_file(option, path, baseline, current)
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
    for role, run_dir in (("baseline", baseline), ("current", current)):
        if problems := RunStore(run_dir).incomplete():
            errors.print(f"[yellow]warning:[/] the {role} run {run_dir} is incomplete: {'; '.join(problems)}",
                         highlight=False)
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
    own = run_dir / "pytest-benchmark.json"
    output = output or own
    _refuse_run_file("--output", output, run_dir, own=own)
    try:
        path = write_pytest_benchmark(run_dir, output)
    except (FileNotFoundError, RunDirError) as exc:
        raise fail(str(exc))
    except OSError as exc:
        raise fail(f"--output {output}: cannot write: {exc.strerror or exc}")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    app()
