"""``flux2bench plan``: the cases a scenario expands to, or a run directory's cases and what ``run --resume`` would
run, without running anything (and without importing torch)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flux2bench.cli.common import console, fail, say
from flux2bench.run_options import RunOptions

if TYPE_CHECKING:
    from flux2bench.case import Case
    from flux2bench.results import CaseResult

KEYS_HELP = "print only the case keys, one per line (for scripts, and for report --timeline-case)"


def plan(scenario: Optional[Path] = typer.Argument(None, help="scenario YAML file (omit with --resume)"),
         resume: Optional[Path] = typer.Option(None, help="run directory: show each of its cases' state, and what "
                                                          "run --resume would run"),
         block: list[str] = typer.Option([], help="only this block (repeatable), as run --block"),
         max_cases: int = typer.Option(RunOptions.model_fields["max_cases"].default, min=1,
                                       help=RunOptions.model_fields["max_cases"].description),
         retry_failed: bool = typer.Option(False, help="with --resume, as run --resume --retry-failed would run"),
         keys: bool = typer.Option(False, "--keys", help=KEYS_HELP)) -> None:
    """Print the cases a scenario expands to, without running them."""
    from flux2bench.drift_baseline import needs_drift
    from flux2bench.runner.orchestrator import still_to_run
    from flux2bench.scenario import load_cases
    from flux2bench.scenario_yaml import ScenarioError
    from flux2bench.store import RunDirError, RunStore

    if (scenario is None) == (resume is None):
        raise fail("give a scenario file, or --resume RUN_DIR (not both)")
    try:
        store = RunStore.open(resume) if resume else None
        source = store.root / "scenario.yaml" if store else scenario
        assert source is not None
        cases = load_cases(source, block, max_cases=max_cases)
        records = store.records().valid if store else {}
        to_run = {c.key for c in still_to_run(store, cases, retry_failed)} if store else set()
    except (ScenarioError, FileNotFoundError, RunDirError) as exc:
        raise fail(str(exc)) from None
    if keys:
        print("\n".join(case.key for case in cases))
        return
    table = Table(title=escape(f"{resume or scenario}: {len(cases)} case{'' if len(cases) == 1 else 's'}"))
    for column in ("#", "block", "case", "runs on"):
        table.add_column(column, overflow="fold")
    # A key is what --timeline-case and the records take: never cut, whatever the terminal's width.
    table.add_column("key", no_wrap=True, min_width=max((len(case.key) for case in cases), default=3))
    if resume:
        table.add_column("state", overflow="fold")
    for i, case in enumerate(cases, 1):
        state = [_state(records.get(case.key), case.key in to_run)] if resume else []
        table.add_row(str(i), escape(case.block), escape(case.label), escape(_runs_on(case)), case.key,
                      *map(escape, state))
    # Piped, the table is not cut to 80 columns: each case stays on one line, for grep and for scripts.
    (console if console.is_terminal else Console(soft_wrap=True, emoji=False, width=1000)).print(table)
    if drifting := [case for case in cases if case.drift_baseline == "run" and needs_drift(case)]:
        say(f"{len(drifting)} of these change{'s' * (len(drifting) == 1)} numerics: run compares their images with "
            "a bf16 drift baseline of the same workload, and runs one (block <block>.baseline) where the run has none")
    if resume:
        say(f"{len(cases) - len(to_run)} finished, {len(to_run)} to run: flux2bench run --resume {resume}"
            + (" --retry-failed" if retry_failed else " (--retry-failed also reruns error, timeout and killed)"))


def _runs_on(case: Case) -> str:
    """What a case needs of the machine: the CPU, or how many GPUs of one host (of which kind, if it names one)."""
    if case.device == "cpu":
        return "CPU"
    from flux2bench.axes import gpu, registry

    count, kind = registry.gpus(case), gpu.AXIS.kind(case)
    gpus = f"{count} {kind or 'GPU'}{'s' if count > 1 else ''}" + (" of one host" if count > 1 else "")
    # device: auto falls back to the CPU; a case split over GPUs, or one that names their kind, cannot
    return gpus if case.device == "cuda" or count > 1 or kind else f"{gpus}, else the CPU"


def _state(record: CaseResult | None, runs: bool) -> str:
    """A case's state in a run directory: its status, and whether ``run --resume`` runs it (again)."""
    if record is None:
        return "to run"
    if record.machine_lacks:
        return f"to run ({record.status}: the machine lacked what it needs)"
    return f"{record.status}, runs again" if runs else str(record.status)
