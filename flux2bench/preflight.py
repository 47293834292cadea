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
