"""What a run adds up to: how many cases ended how, and the exit code of ``flux2bench run``.

``oom``, ``host_oom`` and ``unsupported`` are results (the setup does not fit, or cannot run here), not failures;
a run in which every case is ``unsupported`` measured nothing, which CI should not mistake for a pass.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from flux2bench.exit_codes import EXIT_FAILED, EXIT_NOTHING_MEASURED, EXIT_OK
from flux2bench.results import CaseResult, Status



@dataclass(frozen=True)
class RunOutcome:
    """The records of the cases a run was asked for: counts per status, and the keys that have no record."""

    counts: Counter[Status]
    missing: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        if self.missing or any(status.failed for status in self.counts):
            return EXIT_FAILED
        if set(self.counts) == {Status.UNSUPPORTED}:
            return EXIT_NOTHING_MEASURED
        return EXIT_OK

    def summary(self) -> str:
        """``5 cases: 3 ok, 1 oom, 1 unsupported`` (statuses in Status order, then the cases without a record)."""
        parts = [f"{self.counts[status]} {status}" for status in Status if self.counts[status]]
        if self.missing:
            parts.append(f"{len(self.missing)} without a result")
        total = self.counts.total() + len(self.missing)
        return f"{total} case{'s' if total != 1 else ''}: {', '.join(parts)}"


def run_outcome(case_keys: list[str], records: list[CaseResult]) -> RunOutcome:
    """The outcome of the cases ``case_keys`` (records of other cases, such as drift baselines the runner added,
    do not count)."""
    by_key = {record.key: record for record in records}
    return RunOutcome(Counter(by_key[key].status for key in case_keys if key in by_key),
                      tuple(key for key in case_keys if key not in by_key))


def machine_lacks_every_case(measured: list[CaseResult], deferred: dict[str, str]) -> str | None:
    """When every case this run tried is a machine condition (a case the executor could not place here, or one whose
    worker found the machine lacking), what the machine lacks, in words; both run again on resume."""
    lacking = {result.key: result.reason or "" for result in measured if result.machine_lacks}
    tried = {result.key for result in measured} | deferred.keys()
    if not tried or tried - lacking.keys() - deferred.keys():
        return None
    reasons = {**lacking, **deferred}
    return f"{len(tried)} case{'s' if len(tried) != 1 else ''}: {next(iter(reasons.values()))}"
