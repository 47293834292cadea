"""The runner: a run's cases placed by an executor (``flux2bench.executors``), each supervised in its own worker
process (``flux2bench.supervision``), their records stored durably, then drift.

``run_dir`` opens a run directory; ``orchestrator.Runner`` runs its cases; ``drift_plan`` says which drift
baselines to run and attaches drift; ``session`` is one ``flux2bench run`` from its options.
"""

from flux2bench.runner.orchestrator import Runner, RunProgress
from flux2bench.runner.run_dir import resume_run, run_dir_stem, start_run
from flux2bench.supervision import WORKER_MODULE, CaseSupervisor, Placement, SupervisorConfig

__all__ = ["WORKER_MODULE", "CaseSupervisor", "Placement", "RunProgress", "Runner", "SupervisorConfig",
           "resume_run", "run_dir_stem", "start_run"]
