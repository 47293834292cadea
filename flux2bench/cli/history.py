"""``flux2bench history``: many runs of a scenario, oldest first; per case and gated metric the series, its change
points and, with ``--gate``, an exit code for the newest runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, cast

import typer

from flux2bench.cli.common import check_output, console, fail, refuse_run_file, say, warn, write_output

EPILOG = ("Exit code: with --gate, 1 when the newest runs start (or make significant) a change point that is a "
          "regression beyond its metric's floor, else 0 (also when there is not enough history, which is stated); "
          "without --gate, 0; 2 on unusable input (no usable run directory, bad options, Apache Otava missing) and, with "
          "--gate, when a run among the newest was skipped (the gate cannot judge).")


def history(
    runs: list[Path] = typer.Argument(..., help="run directories, or folders holding them"),
    order: str = typer.Option("time", help="time: by the time each run started (run.json); given: as listed, a "
                                           "folder's runs by name"),
    gate: bool = typer.Option(False, "--gate", help="exit 1 when the newest runs start or reveal a regression"),
    newest: int = typer.Option(1, min=1, help="how many of the newest runs the gate looks at"),
    rules: Optional[Path] = typer.Option(None, help="gate.yaml, as compare reads it: the metrics' floors per block"),
    allow_env_change: bool = typer.Option(False, help="one series across driver and library versions (where they "
                                                      "change is listed); GPU models always stay apart"),
    max_pvalue: float = typer.Option(0.001, help="significance level of a change point (Otava's t-test)"),
    out: Optional[Path] = typer.Option(None, help="folder that receives history.md and history.html"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the history as JSON here"),
) -> None:
    """Many runs of a scenario, oldest first: per case and gated metric, the series and its change points."""
    from flux2bench.compare import CompareError, load_rules
    from flux2bench.history import HistoryError, build_history, write_history
    from flux2bench.history.render import summary_lines, tables
    from flux2bench.preflight import outputs_problem
    from flux2bench.store import writable_folder_problem

    # Outputs are checked before any run is read, and written before anything is printed (as compare does).
    if out is not None and (problem := writable_folder_problem(out, "--out")):
        raise fail(problem)
    if problem := outputs_problem({"--json": json_out}, {"--rules": rules}):
        raise fail(problem)
    check_output("--json", json_out)
    if out is not None:
        refuse_run_file("--out", out, folder=True)
    try:
        built = build_history(runs, cast(Any, order), load_rules(rules) if rules else None, allow_env_change, newest,
                              max_pvalue)
    except (HistoryError, CompareError) as exc:
        raise fail(str(exc)) from None
    if json_out:
        write_output("--json", json_out, built.to_json())
    written = None
    if out:
        try:
            written = write_history(built, out)
        except OSError as exc:
            raise fail(f"--out {out}: cannot write: {exc.strerror or exc}") from None
    for text in built.warnings:
        warn(text)
    for table in tables(built):
        console.print(table)
    say("\n".join(summary_lines(built, gated=gate)))
    if written:
        say(f"history written to {written[1]} (open it in a browser) and {written[0]}")
    if gate and built.unjudged:
        raise fail(f"cannot judge: {built.unjudged}")
    raise typer.Exit(built.exit_code if gate else 0)
