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


def enclosing_run(path: Path, *, folder: bool = False) -> Path | None:
    """The run directory ``path`` lies in (the nearest folder above it that a ``RunStore`` opens: one holding
    ``run.json``), or None. The name itself is not followed (a link there is replaced by the file written, never
    written through); with ``folder``, ``path`` names a folder that may itself be a run directory."""
    target = path.parent.resolve() / path.name if path.name not in ("", ".", "..") else path.resolve()
    for candidate in ((target,) if folder else ()) + tuple(target.parents):
        marker = candidate / "run.json"
        if marker.exists() or marker.is_symlink():
            return candidate
    return None


def refuse_run_file(option: str, path: Path, *, own: Path | None = None, folder: bool = False) -> None:
    """No command writes into a run directory (any of them, passed to it or not) but where it is meant to write in
    its own (``own``): not run.json, not a record, not a new file beside them."""
    from flux2bench.store import RunStore

    if own is not None and path.resolve() == own.resolve():
        return
    run_dir = enclosing_run(path, folder=folder)
    if run_dir is None:
        return
    where = "a file of" if RunStore(run_dir).owns(path) else "inside"
    raise fail(f"{option} {path}: is {where} the run directory {run_dir}; write elsewhere")


def check_output(option: str, path: Path | None, *, own: Path | None = None) -> None:
    """Refuse, before anything is read or written, an output file that cannot be written (a folder or FIFO at its
    name, a file where one of its folders belongs) or that lies in a run directory; its missing folders are made
    when it is written."""
    from flux2bench.preflight import output_file_problem

    if path is None:
        return
    if problem := output_file_problem(option, path):
        raise fail(problem)
    refuse_run_file(option, path, own=own)


def write_output(option: str, path: Path, text: str) -> None:
    """Write a file a command was asked for (its missing folders made): a new file renamed over ``path``, never
    written through a link."""
    from flux2bench.safe_files import make_folders, write_atomic

    try:
        make_folders(path.parent)
        write_atomic(path, text)
    except OSError as exc:
        raise fail(f"{option} {path}: cannot write: {exc.strerror or exc}") from None
