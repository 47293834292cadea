"""The ``flux2bench`` command (also ``python -m flux2bench``).

The command line imports neither torch nor the runner (``flux2bench.cli``): ``flux2bench run`` reads its options,
then starts the fork server, whose imports (torch, diffusers, transformers: 13.5-22 s on an H200 host) overlap the
command's own and its reading of the scenario, before anything heavy is imported here.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from flux2bench.cli import app
    except KeyboardInterrupt:  # Ctrl-C while the command starts: nothing began, so nothing to resume
        print("interrupted while starting; nothing was run", file=sys.stderr)
        raise SystemExit(130) from None
    app()


if __name__ == "__main__":
    main()
