"""What the command line does with an exception no command handled: never a traceback on the terminal.

An input or environment problem (a file that cannot be read or written: ``OSError``) is one line naming the file
and exit code 2; anything else is a defect of flux2bench: one line, the path of a log holding the traceback, and
exit code 4.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path

import typer
from typer.core import TyperGroup

from flux2bench import __version__
from flux2bench.exit_codes import EXIT_BAD_INPUT, EXIT_INTERNAL

LOG_DIR_ENV = "FLUX2BENCH_LOG_DIR"

# The usage errors of the click that typer runs on (the click package, or with newer typer its own copy of click,
# whose classes are not the package's) are the command line's to report: one line and exit code 2.
USAGE_ERROR = sys.modules[typer.BadParameter.__module__].ClickException
PASSED_THROUGH = (typer.Exit, typer.Abort, USAGE_ERROR, KeyboardInterrupt, SystemExit)


def crash_log_dir() -> Path:
    return Path(os.environ.get(LOG_DIR_ENV) or Path.home() / ".cache" / "flux2bench" / "crashes")


def write_crash_log(exc: BaseException) -> Path:
    """The traceback of ``exc`` in a new log file (in the temporary folder when the log folder cannot be made)."""
    text = (f"flux2bench {__version__}, {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
            + "".join(traceback.format_exception(exc)))
    try:
        folder = crash_log_dir()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    fd, name = tempfile.mkstemp(prefix="flux2bench-crash-", suffix=".log", dir=folder)
    with os.fdopen(fd, "w") as log:
        log.write(text)
    return Path(name)


def environment_problem(exc: OSError) -> str:
    """``PATH: No space left on device``: the file and what is wrong with it."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


class GuardedGroup(TyperGroup):
    """The command group of ``flux2bench``: turns an unhandled exception into one line and an exit code."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except PASSED_THROUGH:
            raise
        except OSError as exc:
            _error(environment_problem(exc))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception as exc:  # noqa: BLE001 - the guard of last resort
            try:
                where = f"the traceback is in {write_crash_log(exc)}"
            except OSError as log_exc:
                where = f"no log could be written ({environment_problem(log_exc)})"
            _error(f"internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                   f"{where}; please report it")
            raise typer.Exit(EXIT_INTERNAL) from None


def _error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
