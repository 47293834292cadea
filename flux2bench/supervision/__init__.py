"""The case supervisor: one case from its artifacts to its record, in its own worker process.

``supervisor`` (``CaseSupervisor``: what an executor calls, here or on a cluster's node), ``artifacts`` (what a case
needs made first), ``process`` (starting, watching and classifying a worker process).
"""

from flux2bench.supervision.process import WORKER_MODULE
from flux2bench.supervision.supervisor import CaseSupervisor, Placement, SupervisorConfig

__all__ = ["WORKER_MODULE", "CaseSupervisor", "Placement", "SupervisorConfig"]
