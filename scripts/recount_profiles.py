"""Read the profiles of a run's records again with today's code (flux2bench.profiling.take.recount_profile): each
profiled step counted again from the trace it saved by today's categorisation, a load part without the load
phase's allocator peak given the record's. A record made by an earlier version gets the corrected reading without
running anything; nothing measured changes (the trace and the record's peaks are the measurements, the categories
their reading). Each part read again says so in its method.

    python scripts/recount_profiles.py RUN_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from flux2bench.exit_codes import EXIT_BAD_INPUT
from flux2bench.profiling.take import recount_profile
from flux2bench.store import RunDirError, RunStore


def recount(run_dir: Path) -> list[str]:
    store = RunStore.open(run_dir)
    done = []
    with store.locked():
        for result in store.results():
            if recount_profile(result, store.root):
                store.write(result)
            done.append(result.key)
    return done


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        recounted = recount(Path(sys.argv[1]))
    except (OSError, ValueError, RunDirError) as exc:  # no run directory, a trace or record that cannot be read
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    for key in recounted:
        print(f"recounted {key}")
