"""What every command shares: the consoles, a refusal (one line and an exit code), and writing a file it was asked
to write."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from flux2bench.exit_codes import EXIT_BAD_INPUT

# User text (paths, names, reasons) is printed literally: escaped where markup styles a line, never an emoji code.
console = Console(soft_wrap=True, emoji=False)
errors = Console(stderr=True, soft_wrap=True, emoji=False)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """Print ``message`` (literally: no markup in it is read) as the command's one line of error; the exit to raise."""
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def say(text: str) -> None:
    """Print text as it is: paths and names never read as markup or emoji."""
    console.print(text, markup=False, highlight=False, emoji=False)


def warn(text: str) -> None:
    errors.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, emoji=False)


def refuse_run_file(option: str, path: Path, *run_dirs: Path, own: Path | None = None) -> None:
    """A command writes no file of a run directory but its own (``own``): not run.json, not a record."""
    from flux2bench.store import RunStore

    for run_dir in run_dirs:
        if path.resolve() != (own.resolve() if own else None) and RunStore(run_dir).owns(path):
            raise fail(f"{option} {path}: is a file of the run directory {run_dir}; write elsewhere")


def write_output(option: str, path: Path, text: str) -> None:
    """Write a file a command was asked for: a new file renamed over ``path``, never written through a link."""
    from flux2bench.safe_files import write_atomic

    try:
        write_atomic(path, text)
    except OSError as exc:
        raise fail(f"{option} {path}: cannot write: {exc.strerror or exc}") from None
