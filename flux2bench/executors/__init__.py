"""Executors place cases; the case supervisor runs each one; the run's orchestrator keeps the records.

An executor takes the cases a run still needs and, for each, decides where and when it runs: ``local`` spreads them
over this host's GPUs (``--devices``), ``ray`` over the nodes of a Ray cluster. Wherever it places a case, the case
runs through a ``CaseSupervisor`` (the same isolated worker, the same classification of how it ended), and its record
and files reach the run directory through the ``CaseSink`` the executor is given: only placement differs.

Adding an executor: a module with a class that has ``name``, ``slots``, ``from_options``, ``unplaceable`` and
``execute`` (the ``Executor`` protocol), and one entry in ``EXECUTORS``. Remote executors reuse
``flux2bench.executors.remote`` (the files of a case that travel back, a node's environment).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict, field_validator

if TYPE_CHECKING:
    from flux2bench.case import Case
    from flux2bench.results import CaseResult
    from flux2bench.supervision.supervisor import CaseSupervisor

# name -> "module:class"; imported only when chosen (the local path never imports Ray).
EXECUTORS: dict[str, str] = {
    "local": "flux2bench.executors.local:LocalExecutor",
    "ray": "flux2bench.executors.ray:RayExecutor",
}


class ExecutorUnavailable(Exception):
    """The executor cannot be used here (e.g. Ray is not installed, no cluster answers, an option it does not
    take); the message is for the user."""


class ExecutorOptions(BaseModel):
    """Where cases run: the executor's name and the options of the executors that take them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "local"
    devices: tuple[str, ...] | None = None  # local: CUDA_VISIBLE_DEVICES values, one case per device at a time
    address: str | None = None  # ray: the cluster to join (auto: the running one; None: start a local instance)
    keep_node_dirs: bool = False  # ray: keep each node's copy of the run directory after the run

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: object) -> object:
        if isinstance(value, str):
            values = tuple(d.strip() for d in value.split(","))
            if not all(values) or len(set(values)) != len(values):
                raise ValueError(f"--devices {value!r}: expected distinct comma-separated GPU indices or UUIDs, e.g. "
                                 "0,1,2,3")
            return values
        return value


class CaseSink(Protocol):
    """What an executor reports to as cases start and end (the run's orchestrator)."""

    def started(self, case: Case, where: str | None) -> None:
        """The case's worker starts on ``where`` (a device, or a node and its GPUs)."""

    def finished(self, result: CaseResult, files: Mapping[str, bytes] | None = None) -> None:
        """The case's record, and the files its worker wrote elsewhere (by path in the run directory)."""

    def deferred(self, case: Case, reason: str) -> None:
        """The case cannot be placed here: not run and not recorded, so that a resume elsewhere runs it."""

    def knows_node(self, node_id: str) -> bool:
        """Whether the run directory already notes the node's environment."""

    def note_node(self, node_id: str, description: dict[str, object]) -> None:
        """Note, once per node, the environment the cases measured on it ran in."""


class Executor(Protocol):
    name: str
    slots: int  # cases at a time on this host (its workers share the CPUs out by it)

    def unplaceable(self, case: Case) -> str | None:
        """Why this executor can place the case nowhere it can reach (None: it can, or cannot tell before running);
        a run of which no case can be placed is refused before anything is written."""

    def execute(self, cases: list[Case], supervisor: CaseSupervisor, sink: CaseSink) -> None:
        """Run every case through a ``CaseSupervisor`` somewhere, and hand each record to ``sink.finished``; a case
        it cannot place goes to ``sink.deferred``."""


def make_executor(options: ExecutorOptions) -> Executor:
    """The executor ``options.name``, made from the options it takes (one given for another executor is refused)."""
    if options.name not in EXECUTORS:
        raise ExecutorUnavailable(f"unknown executor {options.name!r}; known: {', '.join(EXECUTORS)}")
    module, _, name = EXECUTORS[options.name].partition(":")
    executor: Executor = getattr(importlib.import_module(module), name).from_options(options)
    return executor


def refuse_foreign(options: ExecutorOptions, taken: tuple[str, ...]) -> None:
    """Refuse an option that the executor ``options.name`` does not take, naming the executor that does."""
    owners = {"devices": "local", "address": "ray", "keep_node_dirs": "ray"}
    for field, owner in owners.items():
        if field not in taken and getattr(options, field) not in (None, False):
            flag = "--" + field.replace("_", "-")
            raise ExecutorUnavailable(f"{flag} is for the {owner} executor (--executor {owner}), not "
                                      f"{options.name}")
