"""One ``flux2bench run`` from its options: every refusal decided before anything is written, the run directory
opened, the cases run, and what the run adds up to. The command line only prints and exits."""

from __future__ import annotations

from dataclasses import dataclass, field

from flux2bench.artifact_cache import cache_root
from flux2bench.case import Case
from flux2bench.executors import Executor, ExecutorUnavailable, make_executor
from flux2bench.exit_codes import EXIT_BAD_INPUT, EXIT_NOTHING_MEASURED
from flux2bench.outcome import RunOutcome, machine_lacks_every_case, run_outcome
from flux2bench.preflight import worker_environment_problem
from flux2bench.profiling import profiled
from flux2bench.results import CaseResult
from flux2bench.run_options import RunOptions
from flux2bench.runner.orchestrator import Runner, RunProgress, still_to_run
from flux2bench.runner.run_dir import resume_run, start_run
from flux2bench.scenario import case_limit, load_cases
from flux2bench.scenario_yaml import ScenarioError
from flux2bench.store import RunDirError, RunStore, writable_folder_problem
from flux2bench.supervision.supervisor import SupervisorConfig


class Refused(Exception):
    """The run cannot start as asked; nothing was written. The message is for the user."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Finished:
    """What a run added up to: the outcome of its cases, what the machine lacked for every case it tried (None when
    it could run some), and the cases deferred to a machine that can run them."""

    outcome: RunOutcome
    machine_lacks: str | None
    deferred: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


class RunSession:
    """A run's cases, run directory and runner, opened from ``options`` (``open``), then run (``run``)."""

    def __init__(self, options: RunOptions, store: RunStore, cases: list[Case], executor: Executor):
        self.options = options
        self.store = store
        self.cases = cases
        self.executor = executor

    @classmethod
    def open(cls, options: RunOptions) -> RunSession:
        """Check what can be checked without writing, then open the run directory; raises ``Refused``."""
        if problem := worker_environment_problem():
            raise Refused(problem)
        cache = cache_root(options.cache)
        folders = [(options.out, "--out")] if options.resume is None else []
        folders += [(folder, flag) for folder, flag in ((cache, "--cache"), (options.checkpoints, "--checkpoints"))
                    if folder is not None]
        for folder, flag in folders:
            if problem := writable_folder_problem(folder, flag):
                raise Refused(problem)
        try:
            executor = make_executor(options.executor)
        except ExecutorUnavailable as exc:
            raise Refused(str(exc)) from None
        try:
            with case_limit(options.max_cases):
                cls._refuse_what_cannot_run_here(options, executor)
                store, cases = cls._open_run_dir(options)
        except (ScenarioError, RunDirError, FileNotFoundError, FileExistsError) as exc:
            raise Refused(str(exc)) from None
        except OSError as exc:
            raise Refused(f"cannot write the run directory: {exc}") from None
        return cls(options, store, profiled(cases) if options.profile else cases, executor)

    @staticmethod
    def _open_run_dir(options: RunOptions) -> tuple[RunStore, list[Case]]:
        blocks = list(options.blocks)
        if options.resume is not None:
            return resume_run(options.resume, blocks, options.host_label)
        assert options.scenario is not None
        return start_run(options.scenario, out_root=options.out, blocks=blocks, host_label=options.host_label,
                         label=options.label)

    @staticmethod
    def _refuse_what_cannot_run_here(options: RunOptions, executor: Executor) -> None:
        """A scenario of which this machine can run no case still to run is refused before anything is written
        (exit code 3): a run directory of records that each say "no GPU" helps nobody."""
        if options.drift_only:
            return
        if options.resume is not None:
            store = RunStore.open(options.resume)
            cases = still_to_run(store, load_cases(store.root / "scenario.yaml", list(options.blocks)),
                                 options.retry_failed)
        else:
            assert options.scenario is not None
            cases = load_cases(options.scenario, list(options.blocks))
        reasons = [reason for case in cases if (reason := executor.unplaceable(case)) is not None]
        if cases and len(reasons) == len(cases):
            raise Refused(f"this machine cannot run any case still to run ({len(cases)} case"
                          f"{'s' if len(cases) != 1 else ''}: {reasons[0]}); run it on a machine that has what the "
                          "cases need", exit_code=EXIT_NOTHING_MEASURED)

    def supervisor_config(self) -> SupervisorConfig:
        return SupervisorConfig(worker_start=self.options.worker_start, cache=cache_root(self.options.cache),
                                checkpoints=self.options.checkpoints.resolve() if self.options.checkpoints else None)

    def pending_keys(self) -> set[str]:
        return {c.key for c in self.cases} - self.store.completed_keys()

    def run(self, progress: RunProgress) -> Finished:
        """Run the cases (``--drift-only``: attach drift only); the records are in the run directory."""
        runner = Runner(self.store, self.supervisor_config(), executor=self.executor, progress=progress,
                        retry_failed=self.options.retry_failed)
        measured: list[CaseResult] = runner.run(self.cases, measure=not self.options.drift_only)
        return Finished(run_outcome([c.key for c in self.cases], self.store.results()),
                        machine_lacks_every_case(measured, progress.deferred), progress.deferred, progress.skipped)

    def gpu_change(self) -> str | None:
        """What a resume on another GPU model means, or None when the GPU model is the one the run was created on."""
        meta = self.store.meta
        if not meta.get("resumed"):
            return None
        created = (meta.get("environment") or {}).get("gpu_name")
        now = (meta["resumed"][-1].get("environment") or {}).get("gpu_name")
        if created and now and created != now:
            return (f"this run was created on {created} and now runs on {now}: its cases will have been measured on "
                    "two GPU models (the report says which ran each; compare refuses such a run)")
        return None
