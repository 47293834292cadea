"""``flux2bench compare``: two runs, case by case; the exit code gates regressions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flux2bench.cli.common import check_output, fail, say, warn, write_output


def compare(
    baseline: Path = typer.Argument(..., help="the baseline run directory (what the current run is gated against)"),
    current: Path = typer.Argument(..., help="current run directory"),
    rules: Optional[Path] = typer.Option(None, help="gate.yaml with thresholds and per-block overrides"),
    allow_env_change: bool = typer.Option(False, help="compare although driver or library versions differ"),
    fail_on_improvement: bool = typer.Option(False, help="also fail on unexplained large improvements"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the JSON verdict here"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="write the Markdown summary here"),
) -> None:
    """Compare two runs, case by case; the exit code gates regressions.

    Exit code: 0 on pass, 1 on a regression, 2 on bad input or runs that cannot be compared (another GPU model,
    other driver or library versions, no case in common, a record no measurement gives)."""
    from flux2bench.compare import CompareError, compare_runs, load_rules
    from flux2bench.preflight import outputs_problem
    from flux2bench.store import RunDirError, RunStore

    if problem := outputs_problem({"--json": json_out, "--markdown": markdown_out}, {"--rules": rules}):
        raise fail(problem)
    for option, path in (("--json", json_out), ("--markdown", markdown_out)):
        check_output(option, path)
    try:
        verdict = compare_runs(baseline, current, rules=load_rules(rules) if rules else None,
                               allow_env_change=allow_env_change, fail_on_improvement=fail_on_improvement)
    except (CompareError, RunDirError) as exc:
        raise fail(str(exc)) from None
    markdown = verdict.markdown()
    if json_out:
        write_output("--json", json_out, verdict.to_json())
    if markdown_out:
        write_output("--markdown", markdown_out, markdown)
    say(markdown)
    for role, run_dir in (("baseline", baseline), ("current", current)):
        if problems := RunStore(run_dir).incomplete():
            warn(f"the {role} run {run_dir} is incomplete: {'; '.join(problems)}")
    raise typer.Exit(verdict.exit_code)
