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


def refuse_run_file(option: str, path: Path, *, own: Path | None = None, folder: bool = False) -> None:
    """Stop the command where ``path`` lies in a run directory (``preflight.run_file_problem``)."""
    from flux2bench.preflight import run_file_problem

    if problem := run_file_problem(option, path, own=own, folder=folder):
        raise fail(problem)


def check_output(option: str, path: Path | None, *, own: Path | None = None) -> None:
    """Refuse, before anything is read or written, an output file that cannot be written (a folder or FIFO at its
    name, a file where one of its folders belongs) or that lies in a run directory (``preflight.output_problem``);
    its missing folders are made when it is written."""
    from flux2bench.preflight import output_problem

    if path is not None and (problem := output_problem(option, path, own=own)):
        raise fail(problem)


def write_output(option: str, path: Path, text: str) -> None:
    """Write a file a command was asked for (its missing folders made): a new file renamed over ``path``, never
    written through a link."""
    from flux2bench.safe_files import make_folders, write_atomic

    try:
        make_folders(path.parent)
        write_atomic(path, text)
    except OSError as exc:
        raise fail(f"{option} {path}: cannot write: {exc.strerror or exc}") from None
