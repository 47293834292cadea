"""The worker process: runs one case (or makes one case's artifact) and writes its result record.

Started by the runner as ``python -m flux2bench.worker CASE_JSON RESULT_JSON RUN_DIR [--prepare AXIS]``. Before
anything heavy is imported it asks the kernel to kill it when the runner dies, and exits if the runner is already
gone, so that no orphan keeps running. It reports its stages to the runner through the file descriptor named by
``FLUX2BENCH_EVENTS_FD`` (one JSON line per event).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

from flux2bench import child_env
from flux2bench.cgroup import join as join_cgroup

# The worker's own exit when the runner that started it is gone: nobody would read its record.
EXIT_RUNNER_GONE = 3

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Ask Linux to SIGKILL this worker when the runner dies; False when the runner is already gone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    expected = os.environ.get(child_env.PARENT_PID)
    # The runner may have died before prctl took effect: then this process was re-parented.
    return expected is None or str(os.getppid()) == expected


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # the start of the time to first image
    if not die_with_parent():
        return EXIT_RUNNER_GONE
    if cgroup := os.environ.get(child_env.CGROUP):  # a RAM cap: every byte this worker allocates counts against it
        join_cgroup(cgroup)
    args = list(sys.argv[1:] if argv is None else argv)
    prepare = None
    if "--prepare" in args:
        at = args.index("--prepare")
        prepare = args[at + 1]
        del args[at:at + 2]
    case_path, result_path, run_dir = args
    from flux2bench.case_run import run_worker  # heavy imports (torch, diffusers) only after the checks above
    from flux2bench.overhead import WorkerStart

    spawned = os.environ.get(child_env.SPAWNED_AT)
    preloaded = sys.modules.get("flux2bench.worker_preload")  # present when the fork server forked this worker
    start = WorkerStart(float(spawned) if spawned else None, started, time.perf_counter(),
                        getattr(preloaded, "IMPORT_S", None) or 0.0)
    fd = os.environ.get(child_env.EVENTS_FD)
    return run_worker(Path(case_path), Path(result_path), Path(run_dir), int(fd) if fd else None, prepare, start)


if __name__ == "__main__":
    sys.exit(main())
