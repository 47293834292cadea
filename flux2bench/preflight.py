"""What a command refuses before it writes anything, beyond its own options: the process environment its workers
inherit, output files that would overwrite one another or an input, and output files that cannot be written."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from flux2bench.safe_files import check_target

# OpenMP's thread count as the workers apply it (``torch.set_num_threads``): one positive whole number.
_THREADS = re.compile(r"[1-9][0-9]{0,4}")


def worker_environment_problem(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the workers could not start in this environment, in one line, or None."""
    threads = environ.get("OMP_NUM_THREADS")
    if threads is not None and not _THREADS.fullmatch(threads.strip()):
        return (f"OMP_NUM_THREADS={threads!r} is not a number of threads (a whole number from 1 to 99999); every "
                "worker would fail on it: set it to one, e.g. OMP_NUM_THREADS=8, or unset it")
    return None


def outputs_problem(outputs: Mapping[str, Path | None], inputs: Mapping[str, Path | None] = {}) -> str | None:
    """Why the output files named by options (``{"--json": path}``) cannot all be written: two of them are one
    file, or one of them is an input file; None when they are distinct."""
    seen: dict[Path, str] = {}
    for option, path in inputs.items():
        if path is not None:
            seen[path.resolve()] = option
    for option, path in outputs.items():
        if path is None:
            continue
        other = seen.get(path.resolve())
        if other is not None:
            return f"{option} {path}: is the file {other} names too; give each output a file of its own"
        seen[path.resolve()] = option
    return None


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


def run_file_problem(option: str, path: Path, *, own: Path | None = None, folder: bool = False) -> str | None:
    """Why ``path`` may not be written: no command writes into a run directory (any of them, passed to it or not)
    but where it is meant to write in its own (``own``): not run.json, not a record, not a new file beside them."""
    from flux2bench.store import RunStore

    if own is not None and path.resolve() == own.resolve():
        return None
    run_dir = enclosing_run(path, folder=folder)
    if run_dir is None:
        return None
    where = "a file of" if RunStore(run_dir).owns(path) else "inside"
    return f"{option} {path}: is {where} the run directory {run_dir}; write elsewhere"


def output_problem(option: str, path: Path, *, own: Path | None = None) -> str | None:
    """Why an output file cannot or may not be written (``output_file_problem``, ``run_file_problem``), or None."""
    return output_file_problem(option, path) or run_file_problem(option, path, own=own)


def output_file_problem(option: str, path: Path) -> str | None:
    """Why the output file ``path`` that ``option`` names cannot be written, in one line naming it, or None. Its
    missing folders are made when it is written, so the problem is a file where one of them belongs, a folder that
    cannot be written, or something at its name that is not a file (a folder, a FIFO, a device)."""
    try:
        existing = next((f for f in (path.parent, *path.parent.parents) if f.exists()), None)
        if existing is not None and not existing.is_dir():
            return f"{option} {path}: {existing} is a file, not a folder"
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            return f"{option} {path}: {existing} cannot be written"
        check_target(path)
    except OSError as exc:  # a folder that cannot be searched, a FIFO or a folder at the name
        return f"{option} {path}: cannot write: {exc.strerror or exc}"
    return None
