"""Executors place cases; the runner supervises them.

An executor takes the cases a run still needs and, for each, decides where its worker process runs and when:
``local`` spreads them over this host's GPUs (``--devices``), ``ray`` over the nodes of a Ray cluster. Either way
the case runs through ``Runner.run_case``, the same isolated worker and the same classification of how it ended,
and its record reaches the run directory through ``Runner.record``: only placement differs.

``Placement`` is what a record says about where its case ran.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from flux2bench.case import Case
    from flux2bench.runner import Runner

EXECUTORS = ("local", "ray")


class ExecutorUnavailable(Exception):
    """The executor cannot be used here (e.g. Ray is not installed, or no cluster answers); the message is for the
    user."""


@dataclass(frozen=True)
class Placement:
    """Where a case's worker ran: which executor placed it, on which host (and Ray node), on which kind of GPU."""

    executor: str
    host: str
    node_id: str | None = None
    gpu_kind: str | None = None
    ray_version: str | None = None

    @classmethod
    def here(cls, executor: str = "local", **fields: str | None) -> Placement:
        return cls(executor, socket.gethostname(), **fields)


class Executor(Protocol):
    name: str

    def execute(self, runner: Runner, cases: list[Case]) -> None:
        """Run every case through ``runner.run_case`` somewhere and hand each record to ``runner.record``."""


def make_executor(name: str, devices: list[str] | None = None, address: str | None = None) -> Executor:
    """The executor called ``name``: ``local`` over ``devices`` (CUDA_VISIBLE_DEVICES values), or ``ray`` joining
    the cluster at ``address`` (``auto``: the running one; None: a local Ray instance is started)."""
    if name == "local":
        if address is not None:
            raise ExecutorUnavailable("--address is for --executor ray")
        from flux2bench.executors.local import LocalExecutor

        return LocalExecutor(devices)
    if name == "ray":
        if devices:
            raise ExecutorUnavailable("--devices is for the local executor; Ray places cases on GPUs itself")
        from flux2bench.executors.ray import RayExecutor

        return RayExecutor(address)
    raise ExecutorUnavailable(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}")
