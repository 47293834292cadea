"""The environment variables through which flux2bench hands its own settings to the processes it starts (workers,
the fork server): the one place they are named. A child reads them; no caller's value of them is ever passed on
(``INTERNAL``), so that nothing outside a run steers its workers. Standard library only: the fork server's process
imports it before torch."""

EVENTS_FD = "FLUX2BENCH_EVENTS_FD"  # the pipe a worker reports its stages on
PARENT_PID = "FLUX2BENCH_RUNNER_PID"  # the process a worker must die with
SPAWNED_AT = "FLUX2BENCH_SPAWNED_AT"  # the runner's time.perf_counter() just before it started the worker
CGROUP = "FLUX2BENCH_CGROUP"  # the memory-capped cgroup a worker joins before it allocates (a RAM cap)
FORK_SERVER_LOG = "FLUX2BENCH_FORK_SERVER_LOG"  # "PID:FD": the runner's pipe that takes the fork server's output
# The artifact cache a worker keeps compiled code in (compile_cache: portable): the run's --cache, else a folder of
# the run directory.
ARTIFACT_CACHE = "FLUX2BENCH_ARTIFACT_CACHE"

INTERNAL = frozenset({EVENTS_FD, PARENT_PID, SPAWNED_AT, CGROUP, FORK_SERVER_LOG, ARTIFACT_CACHE})
