"""``flux2bench export``: a run in another tool's format."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flux2bench.cli.common import check_output, fail, say, warn


def export(
    run_dir: Path = typer.Argument(..., help="run directory"),
    format: str = typer.Option("pytest-benchmark", help="output format (pytest-benchmark)"),
    output: Optional[Path] = typer.Option(None, help="output file (default: RUN_DIR/pytest-benchmark.json)"),
) -> None:
    """Export a run in another tool's format."""
    from flux2bench.export import write_pytest_benchmark
    from flux2bench.store import RunDirError, RunStore

    if format != "pytest-benchmark":
        raise fail(f"unknown format {format!r}; supported: pytest-benchmark")
    own = run_dir / "pytest-benchmark.json"
    if output is not None:
        check_output("--output", output, own=own)
    output = output or own
    try:
        path = write_pytest_benchmark(run_dir, output)
    except (FileNotFoundError, RunDirError) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"--output {output}: cannot write: {exc.strerror or exc}") from None
    say(f"wrote {path}")
    if problems := RunStore(run_dir).incomplete():
        warn(f"the run {run_dir} is incomplete: {'; '.join(problems)}")
