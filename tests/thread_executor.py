"""A third executor, as a test double: cases run in a pool of threads on this machine. It exists to show what an
executor is: one module, one entry in ``flux2bench.executors.EXECUTORS`` (the ``thread_executor`` fixture adds it),
and it passes the executor contract (tests/executors/test_executor_contract.py) as the local and Ray executors do."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from flux2bench.axes import gpu
from flux2bench.case import Case
from flux2bench.executors import CaseSink, ExecutorOptions, refuse_foreign
from flux2bench.supervision import CaseSupervisor, Placement

NAME = "threads"


class ThreadExecutor:
    name = NAME
    slots = 2

    @classmethod
    def from_options(cls, options: ExecutorOptions) -> ThreadExecutor:
        refuse_foreign(options, ())
        return cls()

    def unplaceable(self, case: Case) -> str | None:
        kind = gpu.AXIS.kind(case)
        return None if kind is None else f"needs a {kind} GPU; the thread executor places cases on this CPU only"

    def execute(self, cases: list[Case], supervisor: CaseSupervisor, sink: CaseSink) -> None:
        placeable = []
        for case in cases:
            if (reason := self.unplaceable(case)) is not None:
                sink.deferred(case, reason)
            else:
                placeable.append(case)
        with ThreadPoolExecutor(self.slots) as pool:
            for done in [pool.submit(self._run, case, supervisor, sink) for case in placeable]:
                done.result()

    def _run(self, case: Case, supervisor: CaseSupervisor, sink: CaseSink) -> None:
        sink.started(case, "thread")
        sink.finished(supervisor.run(case, None, Placement.here(NAME), slots=self.slots))
