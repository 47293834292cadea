"""The ``flux2bench`` command (also ``python -m flux2bench``).

For a run whose workers the fork server starts, the server starts here, before the command line imports torch and
the rest of flux2bench: the server's imports (torch, diffusers, transformers: 13.5-22 s on an H200 host) then overlap
the command's own (about 4 s there) and its reading of the scenario, instead of following them. The arguments are
read here only for that; the command line parses and checks them. A run that then refuses its input exits at once;
its server ends when its imports do.
"""

from __future__ import annotations

import sys

from flux2bench.fork_server import DEFAULT_START, forks_workers, shared_server


def _option(argv: list[str], name: str) -> str | None:
    """The last value given for ``name`` (``--name VALUE`` or ``--name=VALUE``), as click reads it."""
    value = None
    for at, arg in enumerate(argv):
        if arg == name and at + 1 < len(argv):
            value = argv[at + 1]
        elif arg.startswith(name + "="):
            value = arg.partition("=")[2]
    return value


def starts_fork_server(argv: list[str]) -> bool:
    """Whether ``flux2bench ARGV`` is a run that forks its workers."""
    if argv[:1] != ["run"] or "--help" in argv:
        return False
    return forks_workers(_option(argv, "--worker-start") or DEFAULT_START, _option(argv, "--executor") or "local",
                         "--drift-only" in argv)


def main() -> None:
    if starts_fork_server(sys.argv[1:]):
        shared_server().start()
    try:
        from flux2bench.cli import app
    except KeyboardInterrupt:  # Ctrl-C while the command starts: nothing began, so nothing to resume
        print("interrupted while starting; nothing was run", file=sys.stderr)
        raise SystemExit(130) from None
    app()


if __name__ == "__main__":
    main()
