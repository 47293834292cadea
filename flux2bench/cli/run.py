"""``flux2bench run``: the options read into one ``RunOptions``, the fork server started before torch is imported
(where the run's workers fork), then the run (``flux2bench.runner.session``), its summary, report and exit code."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from pydantic import ValidationError

from flux2bench.cli.common import console, errors, fail, say, warn
from flux2bench.exit_codes import EXIT_INTERRUPTED, EXIT_NOTHING_MEASURED, EXIT_TERMINATED
from flux2bench.run_options import RunOptions

if TYPE_CHECKING:
    from flux2bench.runner.session import Finished, RunSession

EPILOG = ("Exit code: 0 when every case has a result and none failed; 1 when a case failed (error, timeout, killed, "
          "drift_fail; oom and unsupported are results); 3 when nothing was measured (every case unsupported, or "
          "this machine lacks what every case left needs); 2 on bad input or an unusable run directory; 4 on an "
          "internal error (with a log); 130 or 143 when stopped by Ctrl-C or SIGTERM (resume later).")
_HELP = {name: field.description or "" for name, field in RunOptions.model_fields.items()}
_DEVICES_HELP = ("GPUs to spread cases over, one case per GPU at a time (CUDA_VISIBLE_DEVICES values, e.g. 0,1,2,3); a "
                 "case over N GPUs holds N of them; cases then share the host's CPU, RAM and PCIe bandwidth")


def run(
    scenario: Optional[Path] = typer.Argument(None, help=_HELP["scenario"]),
    out: Path = typer.Option(Path("runs"), help=_HELP["out"]),
    resume: Optional[Path] = typer.Option(None, help=_HELP["resume"]),
    retry_failed: bool = typer.Option(False, help=_HELP["retry_failed"]),
    drift_only: bool = typer.Option(False, help=_HELP["drift_only"]),
    report: bool = typer.Option(True, help=_HELP["report"]),
    profile: bool = typer.Option(False, "--profile", help=_HELP["profile"]),
    block: list[str] = typer.Option([], help=_HELP["blocks"] + " (repeatable)"),
    devices: Optional[str] = typer.Option(None, help=_DEVICES_HELP),
    max_cases: int = typer.Option(RunOptions.model_fields["max_cases"].default, min=1, help=_HELP["max_cases"]),
    host_label: Optional[str] = typer.Option(None, help=_HELP["host_label"]),
    label: Optional[str] = typer.Option(None, help=_HELP["label"]),
    checkpoints: Optional[Path] = typer.Option(None, help=_HELP["checkpoints"]),
    cache: Optional[Path] = typer.Option(None, help=_HELP["cache"]),
    executor: str = typer.Option("local", help="where cases run: local (this host, over --devices) or ray (the "
                                               "nodes of a Ray cluster; pip install 'flux2bench[ray]')"),
    address: Optional[str] = typer.Option(None, help="with --executor ray: the cluster to join (auto: the running "
                                                     "one; default: start a local Ray instance)"),
    keep_node_dirs: bool = typer.Option(False, help="with --executor ray: keep each node's copy of the run directory "
                                                    "(default: removed when the run ends)"),
    worker_start: str = typer.Option(RunOptions.model_fields["worker_start"].default, help=_HELP["worker_start"]),
) -> None:
    """Run every case of a scenario, each in its own process.

    Each case's result is stored in the run directory as it finishes; then the report is written."""
    options = _options(scenario=scenario, resume=resume, out=out, blocks=tuple(block), max_cases=max_cases,
                       retry_failed=retry_failed, drift_only=drift_only, report=report, profile=profile, host_label=host_label,
                       label=label,
                       checkpoints=checkpoints, cache=cache, worker_start=worker_start,
                       executor=dict(name=executor, devices=devices, address=address, keep_node_dirs=keep_node_dirs))
    if options.forks_workers:  # its imports (torch, diffusers) overlap this command's own and its checks
        from flux2bench.fork_server import shared_server

        shared_server().start()
    session = _open(options)
    if options.report:  # imported while the first worker starts, which takes longer, rather than after the last case
        import flux2bench.report  # noqa: F401
    finished = _run(session)
    _summarise(session, finished)
    raise typer.Exit(EXIT_NOTHING_MEASURED if finished.machine_lacks else finished.outcome.exit_code)


def _options(**values: Any) -> RunOptions:
    """The options, validated; a bad one is one line naming it."""
    try:
        return RunOptions(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if not isinstance(part, int))
        message = str(first["msg"]).removeprefix("Value error, ")
        flag = "--" + where.split(".")[-1].replace("_", "-") if where else ""
        raise fail(message if message.startswith("--") or not flag else f"{flag}: {message}") from None


def _open(options: RunOptions) -> RunSession:
    from flux2bench.runner.session import Refused, RunSession

    try:
        session = RunSession.open(options)
    except Refused as exc:
        raise fail(str(exc), exc.exit_code) from None
    where = f", {session.executor.slots} at a time on GPUs {','.join(options.executor.devices)}" \
        if options.executor.devices else ""
    where += f", on Ray ({options.executor.address or 'a local instance'})" if options.executor.name == "ray" else ""
    say(f"run directory: {session.store.root}  ({len(session.cases)} cases{where})")
    if change := session.gpu_change():
        warn(change)
    return session


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(session: RunSession) -> Finished:
    from flux2bench.crash import environment_problem
    from flux2bench.executors import ExecutorUnavailable
    from flux2bench.progress_display import ProgressDisplay
    from flux2bench.store import RunDirError

    root = session.store.root
    display = ProgressDisplay(session.pending_keys(), console)
    try:
        with _terminate_as_interrupt(), display as hooks:
            return session.run(hooks)
    except (RunDirError, ExecutorUnavailable) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # e.g. a full disk: the records written so far are intact
        raise fail(f"cannot write to the run directory: {environment_problem(exc)}; the records written so far "
                   f"are intact: flux2bench run --resume {root}") from None
    except KeyboardInterrupt as exc:
        finished = session.store.completed_keys() & {c.key for c in session.cases}
        name = "terminated" if isinstance(exc, Terminated) else "interrupted"
        errors.print(f"{name}: stopped with {len(finished)} of {len(session.cases)} cases finished; the case that "
                     f"was running runs again on resume:\n  flux2bench run --resume {root}",
                     markup=False, highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED if name == "interrupted" else EXIT_TERMINATED) from None


def _summarise(session: RunSession, finished: Finished) -> None:
    root = session.store.root
    if finished.skipped:
        say(f"skipped {len(finished.skipped)} finished case(s) (--resume)")
    if deferred := finished.deferred:
        say(f"{len(deferred)} case{'s' if len(deferred) != 1 else ''} not run on this machine (see above); they run "
            f"on: flux2bench run --resume {root}")
    say(finished.outcome.summary())
    if session.options.report:
        _write_report(root)
    if finished.machine_lacks:
        errors.print(f"error: this machine cannot run any of the remaining cases ({finished.machine_lacks}); none is "
                     f"a result about its setup, and each runs again with flux2bench run --resume {root} on a "
                     "machine that has what it needs", markup=False, highlight=False)


def _write_report(run_dir: Path) -> None:
    """The report at the end of a run; one that cannot be written does not change the run's exit code."""
    from flux2bench.crash import environment_problem
    from flux2bench.report import build_report

    try:
        built = build_report(run_dir)
    except OSError as exc:
        errors.print(f"error: the report could not be written ({environment_problem(exc)}); the records are "
                     f"intact: write it later with flux2bench report {run_dir}", markup=False, highlight=False)
        return
    say(f"report: {built.html} and {built.markdown}")


__all__ = ["EPILOG", "run"]
