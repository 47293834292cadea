"""The drift plan: which cases await drift, which bf16 drift baselines the runner must still run, and attaching
each case's drift against its drift baseline: as cases finish where that drift baseline is final (so that a run
stopped early keeps it), and once every case has run (so that the rest does not depend on the order they finish in)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flux2bench.axes import registry
from flux2bench.case import DRIFT_BASELINE_SUFFIX, Case
from flux2bench.drift import METRIC_NAMES, apply_thresholds, compare_outputs, drift_label
from flux2bench.drift_baseline import (drift_baseline_case, drift_baseline_identity, is_attempt, is_drift_baseline,
                                       needs_drift, own_drift_baseline, pick_drift_baseline, serves_as)
from flux2bench.identity import changed
from flux2bench.results import CaseResult, Drift, Metric, Status
from flux2bench.scenario import DriftThresholds
from flux2bench.store import inside


def awaiting_drift(cases: list[Case], records: list[CaseResult]) -> list[tuple[Case, CaseResult]]:
    """The cases whose record is ok, changes numerics, wants drift and has none yet, or had no drift baseline to compare
    with when it was last looked at (a resumed run may have measured one since)."""
    by_key = {r.key: r for r in records}

    def awaits(case: Case, record: CaseResult | None) -> bool:
        return (record is not None and case.drift_baseline != "off" and record.status == Status.OK
                and (record.drift is None or record.drift.baseline_key is None) and needs_drift(record.case))

    return [(c, by_key[c.key]) for c in cases if awaits(c, by_key.get(c.key))]


def drift_to_attach(run_dir: Path, selected: list[Case], run_cases: list[Case],
                    records: list[CaseResult]) -> list[tuple[Case, CaseResult]]:
    """The selected cases awaiting drift, and the run directory's other cases awaiting it whose drift baseline is
    there now, with both images still on disk: a drift baseline measured for one block (``run --block``) serves every block
    of the same workload."""
    chosen = {c.key for c in selected}
    others = [c for c in run_cases if c.key not in chosen]

    def comparable(record: CaseResult) -> bool:
        baseline = pick_drift_baseline(record.case, records)
        return baseline is not None and _images_on_disk(run_dir, record) and _images_on_disk(run_dir, baseline)

    return awaiting_drift(selected, records) + [(c, r) for c, r in awaiting_drift(others, records) if comparable(r)]


def ready_drift(run_dir: Path, cases: list[Case], records: list[CaseResult],
                newest: CaseResult) -> list[tuple[Case, CaseResult]]:
    """The cases awaiting drift that ``newest``, the record just written, completes (itself, or those whose drift
    baseline it is), where that drift baseline is final (the batch-1 case of the same setup, or a bf16 drift baseline
    the axes rank first: no later one replaces it) and both images are on disk: what the end of the run would attach."""
    def completes(record: CaseResult) -> bool:
        if record.key == newest.key:
            return True
        own = own_drift_baseline(record.case)
        return serves_as(newest.case, own) if own is not None else is_drift_baseline(newest.case)

    def final(record: CaseResult, baseline: CaseResult) -> bool:
        return own_drift_baseline(record.case) is not None or not any(registry.drift_baseline_rank(baseline.case))

    ready = []
    for case, record in awaiting_drift(cases, records):
        if not completes(record) or (baseline := pick_drift_baseline(record.case, records)) is None:
            continue
        if final(record, baseline) and _images_on_disk(run_dir, record) and _images_on_disk(run_dir, baseline):
            ready.append((case, record))
    return ready


def _images_on_disk(run_dir: Path, record: CaseResult) -> bool:
    return all(inside(run_dir, output.image).exists() for output in record.outputs)


def drift_baselines_to_run(cases: list[Case], records: list[CaseResult], attempt: int) -> list[Case]:
    """The drift baselines to run in ``attempt`` (an index into ``registry.drift_baseline_attempts``), one per identity, named
    after the first case that needs it. An attempt after the first runs only where every earlier attempt's
    drift baseline ran out of memory or cannot run."""
    attempts = registry.drift_baseline_attempts()
    tried: dict[tuple[Any, ...], dict[int, str]] = {}  # identity -> attempt index -> status of that drift baseline
    for record in records:
        if is_drift_baseline(record.case):
            for index, values in enumerate(attempts):
                if is_attempt(record.case, values):
                    tried.setdefault(drift_baseline_identity(record.case), {})[index] = record.status
    wanted = [c for c, r in awaiting_drift(cases, records) if c.drift_baseline == "run"]
    baselines: dict[tuple[Any, ...], Case] = {}
    for case in wanted:
        if (own := own_drift_baseline(case)) is not None:  # one attempt: the same setup at batch 1
            if attempt == 0 and not any(serves_as(r.case, own) for r in records):
                setup = ("own", changed(own, block="", seeds=()).key)  # one per setup, with every batch's seeds
                first = baselines.get(setup, changed(own, block=case.block + DRIFT_BASELINE_SUFFIX))
                baselines[setup] = changed(first, seeds=tuple(sorted({*first.seeds, *own.seeds})))
            continue
        identity = drift_baseline_identity(case)
        earlier = tried.get(identity, {})
        if pick_drift_baseline(case, records) is not None or attempt in earlier:
            continue
        if all(earlier.get(index) in (Status.OOM, Status.UNSUPPORTED) for index in range(attempt)):
            baselines.setdefault(identity, drift_baseline_case(case, attempts[attempt],
                                                               case.block + DRIFT_BASELINE_SUFFIX))
    return list(baselines.values())


def attach_drift(run_dir: Path, case: Case, result: CaseResult, records: list[CaseResult]) -> CaseResult:
    """Compare an ok case that changes numerics with its drift baseline among ``records``; the record is updated."""
    baseline = pick_drift_baseline(result.case, records)
    if baseline is None:
        wanted = ("no finished batch-1 case of the same setup" if own_drift_baseline(result.case) is not None else
                  "no ok bf16 baseline with the same model, prompts, seeds, geometry and steps")
        reason = f"{wanted} (drift_baseline: {case.drift_baseline})"
        result.drift = Drift(None, drift_label(case.weights),
                             {name: Metric.missing("against the bf16 baseline", reason) for name in METRIC_NAMES})
        return result
    result.drift = compare_outputs(run_dir, result, baseline)
    result.drift.failed = apply_thresholds(result.drift, DriftThresholds(**dict(case.drift_thresholds)))
    if result.drift.failed:
        result.status = Status.DRIFT_FAIL
        result.reason = "drift thresholds broken: " + ", ".join(result.drift.failed)
    return result
