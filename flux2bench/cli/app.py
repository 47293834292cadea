"""The ``flux2bench`` command group; each command lives in a module of its own in this package."""

from __future__ import annotations

import typer

from flux2bench import __version__
from flux2bench.cli.common import say
from flux2bench.crash import GuardedGroup

# Click's plain help never cuts an option name (rich's does, at 80 columns when output is not a terminal), and
# uses up to 120 columns where the terminal has them.
app = typer.Typer(cls=GuardedGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"max_content_width": 120})


def _print_version(value: bool) -> None:
    if value:
        say(f"flux2bench {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    """Benchmark and memory-profile FLUX.2 pipelines: what each setup costs on this hardware."""
