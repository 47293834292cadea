"""The run's orchestrator: which cases still need a record, their placement by an executor, the drift baselines
still missing, drift attached as each case's final drift baseline is there and once every case has run, and the run
directory's records and notes.

It holds the run directory for the whole run; the executor places cases, a ``CaseSupervisor`` runs each one, and
every record reaches the run directory through this orchestrator (the executor's ``CaseSink``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from flux2bench.axes import registry
from flux2bench.case import Case
from flux2bench.executors import Executor, ExecutorOptions, make_executor
from flux2bench.results import CaseResult, Status
from flux2bench.runner.drift_plan import attach_drift, drift_baselines_to_run, drift_to_attach, ready_drift
from flux2bench.scenario import load_cases
from flux2bench.store import RunStore
from flux2bench.supervision.supervisor import CaseSupervisor, SupervisorConfig, omp_threads

# What ``retry_failed`` runs again: the harness or the machine broke, not the setup (oom and unsupported are results).
RETRIED = (Status.ERROR, Status.TIMEOUT, Status.KILLED)


@dataclass
class RunProgress:
    """Callbacks a progress display hooks into; all optional. With several devices they are called from several
    threads. ``where`` is the worker's device (a CUDA_VISIBLE_DEVICES value; None: inherited) or node."""

    on_case_start: Callable[[Case, str | None], None] = lambda case, where: None
    on_stage: Callable[[Case, str], None] = lambda case, stage: None
    on_case_end: Callable[[CaseResult], None] = lambda result: None
    on_drift: Callable[[CaseResult], None] = lambda result: None
    on_set_aside: Callable[[Path, str], None] = lambda path, reason: None  # an invalid record moved aside
    # a case this machine (or cluster) cannot place, not run and not recorded: a resume elsewhere runs it
    on_deferred: Callable[[Case, str], None] = lambda case, reason: None
    # something the run goes on without, said once (the artifact cache that failed); default: a Python warning
    on_warning: Callable[[str], None] | None = None
    skipped: list[str] = field(default_factory=list)
    deferred: dict[str, str] = field(default_factory=dict)


class Runner:
    """Runs the cases of one run directory: places them with ``executor`` (default: the local one over this host's
    GPUs), supervises each with ``config``, then measures drift.

    ``retry_failed``: also run again the cases whose record ended ``error``, ``timeout`` or ``killed``.
    """

    def __init__(self, store: RunStore, config: SupervisorConfig | None = None, *, executor: Executor | None = None,
                 progress: RunProgress | None = None, retry_failed: bool = False):
        self.store = store
        self.progress = progress or RunProgress()
        self.retry_failed = retry_failed
        self.executor: Executor = executor or make_executor(ExecutorOptions())
        config = config or SupervisorConfig()
        if config.omp_threads is None:  # the CPUs shared out between the cases that run at once
            config = replace(config, omp_threads=omp_threads(self.executor.slots))
        self.supervisor = CaseSupervisor(store, config, self.progress.on_stage, self.progress.on_warning)
        self._drift_lock = threading.Lock()  # executors over several devices report from several threads
        self._records: dict[str, CaseResult] = {}
        self._drift_cases: list[Case] = []

    def run(self, cases: list[Case], measure: bool = True) -> list[CaseResult]:
        """Run the cases without a record (with ``retry_failed``, also those whose record failed), then attach
        drift to every record that still lacks it. Holds the run directory for the whole run. With ``measure``
        False nothing runs: only the drift of finished cases is attached (e.g. after the images of a run made in
        several parts were brought together)."""
        with self.store.locked():
            self.store.clean_tmp()
            for path, reason in self.store.set_aside_invalid().items():
                self.progress.on_set_aside(path, reason)
            pending = self._pending(cases) if measure else []
            self._records = {r.key: r for r in self.store.results()}
            keys = {c.key for c in cases}
            self._drift_cases = cases + [c for c in self._run_dir_cases() if c.key not in keys]
            if pending:
                self.supervisor.start_fork_server()  # imports while the first artifacts and checks run
            self._place(pending)
            for attempt in range(len(registry.drift_baseline_attempts()) if measure else 0):
                self._place(drift_baselines_to_run(cases, self.store.results(), attempt))
            records = self._attach_drift(cases)
            if pending:
                self._note_fork_server()
        by_key = {r.key: r for r in records}
        return [by_key[c.key] for c in pending if c.key in by_key]  # a deferred case has no record

    def _pending(self, cases: list[Case]) -> list[Case]:
        pending = still_to_run(self.store, cases, self.retry_failed)
        self.progress.skipped.extend(c.key for c in cases if c not in pending)
        return pending

    def _place(self, cases: list[Case]) -> None:
        if cases:
            self.executor.execute(cases, self.supervisor, _Sink(self.store, self.progress, self._drift_as_ready))

    def _drift_as_ready(self, result: CaseResult) -> None:
        """Attach the drift that ``result``, just written, completes (``ready_drift``)."""
        with self._drift_lock:
            self._records[result.key] = result
            records = list(self._records.values())
            for case, record in ready_drift(self.store.root, self._drift_cases, records, result):
                try:
                    self.store.write(attach_drift(self.store.root, case, record, records))
                except Exception:  # noqa: BLE001 - the end-of-run pass attaches it, or fails as it would have
                    continue
                self.progress.on_drift(record)

    def _attach_drift(self, cases: list[Case]) -> list[CaseResult]:
        records = self.store.results()
        for case, result in drift_to_attach(self.store.root, cases, self._run_dir_cases(), records):
            self.store.write(attach_drift(self.store.root, case, result, records))
            self.progress.on_drift(result)
        return records  # attach_drift updated these records in place

    def _note_fork_server(self) -> None:
        """run.json's ``fork_server``: one entry per runner session that ran cases (whether workers were forked, how
        long the server took to import, why not)."""
        state = self.supervisor.fork_server_state()
        if state is None:
            return
        meta = self.store.meta
        meta.setdefault("fork_server", []).append(
            {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **state.to_dict()})
        self.store.update_meta(meta)

    def _run_dir_cases(self) -> list[Case]:
        """Every case of the scenario saved with the run directory (none for a store made without one)."""
        scenario = self.store.root / "scenario.yaml"
        return load_cases(scenario) if scenario.exists() else []


def still_to_run(store: RunStore, cases: list[Case], retry_failed: bool = False) -> list[Case]:
    """The cases without a record that stands: none yet, one of a machine that lacked what the case needs, or (with
    ``retry_failed``) one that failed."""
    done = {key for key, record in store.records().valid.items()
            if not (retry_failed and record.status in RETRIED) and not record.machine_lacks}
    return [c for c in cases if c.key not in done]


class _Sink:
    """Where an executor's records go: into the run directory, and the progress display told."""

    def __init__(self, store: RunStore, progress: RunProgress, written: Callable[[CaseResult], None]):
        self.store = store
        self.progress = progress
        self.written = written

    def started(self, case: Case, where: str | None) -> None:
        self.progress.on_case_start(case, where)

    def finished(self, result: CaseResult, files: Mapping[str, bytes] | None = None) -> None:
        for name, data in (files or {}).items():
            self.store.put_file(name, data)
        self.store.write(result)
        self.progress.on_case_end(result)
        self.written(result)

    def deferred(self, case: Case, reason: str) -> None:
        """Not run and not recorded, so that a resume elsewhere runs it. A machine condition, like a record marked
        ``machine_lacks``, which a resume runs again too; a run whose every case is one of the two exits 3."""
        self.progress.deferred[case.key] = reason
        self.progress.on_deferred(case, reason)

    def knows_node(self, node_id: str) -> bool:
        return node_id in (self.store.meta.get("nodes") or {})

    def note_node(self, node_id: str, description: dict[str, object]) -> None:
        meta = self.store.meta
        meta.setdefault("nodes", {})[node_id] = description
        self.store.update_meta(meta)
