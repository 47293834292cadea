"""The regression gate: compare a current run with a baseline run, case by case, metric by metric.

Here the baseline is the gate's reference run (e.g. the main branch's); drift, within each run, compares a case
with its bf16 baseline case, and the drift metrics the gate reads are those within-run figures.

Cases are matched by their stable case key, never by order. Each metric of each case gets a
``Finding`` whose decision is one of:

* ``pass``: no change beyond the metric's threshold;
* ``regression``: worse beyond the threshold, and decided (fails the gate);
* ``improvement``: better beyond the threshold;
* ``large_improvement``: better beyond the rule's ``large_improvement``; fails the gate only with
  ``fail_on_improvement``, since an unexplained large speed-up often means the work was skipped;
* ``inconclusive``: a change beyond the threshold that the samples cannot tell from noise (too few samples, or
  the test says noise could explain it); listed with what would decide it, never failing;
* ``missing``: the case is absent from one side (a case absent from the *current* run is a
  regression unless the rules say ``missing_case: report``);
* ``reported``: a host-bound metric of runs from different hosts, or a CPU timing: both values shown, not gated;
* ``skipped``: not measured on one side, with the reason.

How each kind of metric is decided:

* status: ranked ok < drift_fail < everything else (oom, host_oom, timeout, error, killed, unsupported);
  a worse rank is a regression (so ``ok`` → ``oom`` always fails), a better one an improvement.
  The other metrics are compared only when both sides ran (ok or drift_fail).
* latency (``s_per_step``: every denoising step of every timed image; ``s_per_image``: one sample per timed
  image; ``load_s``: one per run). A change counts when the medians differ by more than the threshold and by
  more than the baseline run's own spread (its interquartile range relative to its median). It is then decided
  by a one-sided Mann-Whitney U test at ``alpha`` (0.10) where the sample sizes can reach it (the exact test's
  smallest p is 1 / C(n1 + n2, n1), so at least 3 samples per side at 0.10): p <= alpha decides, else it is
  ``inconclusive``. With fewer samples it is ``inconclusive``, unless every current sample differs from every
  baseline sample by more than ``gross`` (50%): far beyond any run-to-run noise measured, so decided anyway.
  Within-run samples do not capture drift between runs (clocks, thermals, other tenants): the threshold absorbs
  it (5% for s/step, 10% for s/image, whose host-side share drifts more); the gate's measured false-positive and
  detection rates are in README.
* host-bound timings (``load_s``, and ``s_per_image``/``s_per_step`` of cases that offload) use
  ``host_threshold`` (15%), and they and host RSS are gated only when both runs' hosts match (a ``--host-label``
  given to both, else machine id, CPU model and count, RAM size, GPU models and PCIe links; never a measured
  bandwidth, which varies between runs on one host); otherwise they are ``reported``. Timings of cases that ran on the CPU
  are always ``reported``: on a shared CPU they follow the other load (reports/gate-cpu-20261126).
* memory (inference-phase peaks of GPU allocated, reserved, device and host RSS): nearly
  deterministic, so no test; a regression needs the growth to exceed both ``threshold`` (relative)
  and ``floor_gib`` (absolute). Skipped, with the reason, when not measured on either side.
* drift (``psnr``, ``ssim``, each case against its run's bf16 baseline image): a regression when
  the value drops by more than ``max_drop`` (dB for PSNR) from the baseline run's value.

Runs from different GPU models are never compared; runs whose driver, CUDA or library versions
differ only with ``allow_env_change`` (the differences are then listed in the verdict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flux2bench.compare.findings import Host, compare_case, latency_finding, missing_finding
from flux2bench.compare.rules import CompareError, GateRules, LatencyRule, load_rules
from flux2bench.compare.verdict import CaseReport, Finding, RunInfo, Verdict, plural
from flux2bench.record_checks import Machines, machine_problems, unmeasured_memory
from flux2bench.results import CaseResult, describe_gpus, measured_on
from flux2bench.store import RunStore, foreign_problem, read_record
from flux2bench.trackers.environment import GPU_IDENTITY, SOFTWARE_IDENTITY, host_differences, merge_environments

__all__ = ["CompareError", "Finding", "GateRules", "LatencyRule", "Run", "RunInfo", "Verdict",
           "compare", "compare_runs", "latency_finding", "load_rules",
           "measurement_environment"]


@dataclass
class Run:
    """A loaded run directory: its run.json and its records by case key, in scenario order. ``machines``: what
    run.json says of every machine the run used (created, Ray nodes, resumed), which bounds its peaks; None for a run
    made in memory, whose ``environment`` bounds them."""

    info: RunInfo
    environment: dict[str, Any]
    results: dict[str, CaseResult]
    machines: Machines | None = field(default=None, repr=False)
    # how the sessions that resumed the run differ from the one that created it (driver, CUDA, library versions)
    resumed_changes: tuple[str, ...] = ()

    def bounds(self) -> Machines:
        return self.machines if self.machines is not None else Machines.of({"environment": self.environment})


def load_run(path: str | Path, role: str) -> Run:
    try:
        store = RunStore.open(path)
        meta = store.meta
    except (OSError, ValueError) as exc:
        raise CompareError(f"{role} run: {exc}") from exc
    results = {}
    for record in sorted(store.results_dir.glob("*.json")):
        try:
            results[record.stem] = read_record(record)
            if problem := foreign_problem(results[record.stem], meta.get("case_keys", [])):
                raise ValueError(problem)
        except (OSError, ValueError) as exc:
            raise CompareError(f"cannot compare: {role} run: unreadable result record {record}: "
                               f"{str(exc).splitlines()[0]}") from exc
    if not results:
        raise CompareError(f"{role} run {path} has no case results")
    order = {key: i for i, key in enumerate(meta.get("case_keys", []))}
    ordered = dict(sorted(results.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))
    info = RunInfo(str(path), meta.get("run_id"), meta.get("created_at"))
    return Run(info, measurement_environment(meta), ordered, Machines.of(meta), resumed_changes(meta))


def resumed_changes(meta: dict[str, Any]) -> tuple[str, ...]:
    """How each session that resumed the run (run.json's ``resumed``) differs from the one that created it in driver,
    CUDA or library versions, each difference once."""
    created = meta.get("environment") or {}
    sessions = [env for session in meta.get("resumed") or [] if (env := (session or {}).get("environment"))]
    return tuple(dict.fromkeys(change for env in sessions for change in _differences(created, env, SOFTWARE_IDENTITY)))


def measurement_environment(meta: dict[str, Any]) -> dict[str, Any]:
    """The environment the run's cases were measured in: the Ray nodes' (merged) where an executor placed them
    on a cluster, else the host's that created the run. The nodes' stable facts identify a Ray run's host; a
    ``--host-label`` given to the run names its nodes together when they recorded none of their own."""
    created_on = meta.get("environment") or {}
    nodes = [node["environment"] for node in (meta.get("nodes") or {}).values() if node.get("environment")]
    if not nodes:
        return created_on
    merged = merge_environments(nodes)
    if merged.get("host_label") is None and created_on.get("host_label") is not None:
        merged = {**merged, "host_label": created_on["host_label"]}
    return merged


def _identity(environment: dict[str, Any], name: str) -> Any:
    return environment[name] if name in environment else (environment.get("versions") or {}).get(name)


def software_identity(environment: dict[str, Any], names: tuple[str, ...] = SOFTWARE_IDENTITY) -> dict[str, Any]:
    """What makes runs comparable, by name: the driver, CUDA and library versions by default (``GPU_IDENTITY``: the
    GPU model)."""
    return {name: _identity(environment, name) for name in names}


def _differences(baseline: dict[str, Any], current: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    pairs = [(name, _identity(baseline, name), _identity(current, name)) for name in names]
    return [f"{name} {'none' if b is None else b} → {'none' if c is None else c}" for name, b, c in pairs if b != c]


def _gpus(run: Run) -> str:
    return describe_gpus(measured_on(run.results.values())) or "not recorded"


def check_environments(baseline: Run, current: Run, allow_env_change: bool) -> list[str]:
    """The software differences that were allowed; raises CompareError for any that is not, and for a case
    measured on another GPU model in one run than in the other (a run over several GPU kinds is compared case by
    case, each against the same case on the same kind)."""
    unlike = [f"{key} ({b.setup.gpu} vs {c.setup.gpu})" for key, b in baseline.results.items()
              if (c := current.results.get(key)) is not None and b.setup.gpu != c.setup.gpu]
    if unlike:
        raise CompareError(f"{len(unlike)} case{'s were' if len(unlike) > 1 else ' was'} measured on different GPU "
                           f"models in the two runs: {'; '.join(unlike[:5])}: their latency and memory are not "
                           "comparable (baseline: {}; current: {})".format(_gpus(baseline), _gpus(current)))
    if not any(r.setup.gpu for r in [*baseline.results.values(), *current.results.values()]):
        gpu = _differences(baseline.environment, current.environment, GPU_IDENTITY)
        if gpu:
            raise CompareError(f"the runs are from different GPU models ({'; '.join(gpu)}): "
                               "their latency and memory are not comparable")
    software = _differences(baseline.environment, current.environment, SOFTWARE_IDENTITY)
    if software and not allow_env_change:
        raise CompareError(f"the runs differ in driver or library versions ({'; '.join(software)}); "
                           "pass --allow-env-change to compare them anyway")
    return software


def compare(baseline: Run, current: Run, rules: GateRules | None = None, allow_env_change: bool = False,
            fail_on_improvement: bool = False) -> Verdict:
    """The verdict on two loaded runs (``compare_runs`` reads them from disk first)."""
    rules = rules or GateRules()
    for role, run in (("baseline", baseline), ("current", current)):
        machines = run.bounds()
        for key, record in run.results.items():
            if problems := ([f"its key {record.key!r} is not the key it is listed under"] if key != record.key
                            else record.problems() or machine_problems(record, machines)):
                raise CompareError(f"cannot compare: {role} run: result record {key} ({run.info.path}): "
                                   f"{problems[0]}")
    for role, run, other in (("baseline", baseline, current), ("current", current, baseline)):
        for key, record in run.results.items():
            # A case that ran measured its inference peaks: one without any, against the same case with some,
            # would skip every peak and pass.
            if (problem := unmeasured_memory(record)) and (mate := other.results.get(key)) is not None \
                    and mate.status.ran and not unmeasured_memory(mate):
                raise CompareError(f"cannot compare: {role} run: result record {key} ({run.info.path}): {problem}")
    env_changes = check_environments(baseline, current, allow_env_change)
    if not baseline.results.keys() & current.results.keys():
        raise CompareError(f"the runs have no case in common (runs of different scenarios?): baseline "
                           f"{baseline.info.path} has {plural(len(baseline.results), 'case')}, current {current.info.path} "
                           f"{len(current.results)}, none with the same case key")
    blocks = {r.block for run in (baseline, current) for r in run.results.values()}
    if unknown := sorted(set(rules.blocks) - blocks):
        raise CompareError(f"the gate rules override blocks that neither run has: {', '.join(unknown)}; the runs' "
                           f"blocks are {', '.join(sorted(blocks))}")
    host = Host(tuple(host_differences(baseline.environment, current.environment)))
    cases = []
    for key in dict.fromkeys([*baseline.results, *current.results]):
        b, c = baseline.results.get(key), current.results.get(key)
        either = b or c
        if b and c:
            findings = compare_case(b, c, rules.for_block(c.block), host)
        else:
            findings = [missing_finding(either, "current" if b else "baseline", rules)]
        cases.append(CaseReport(key, either.label, either.block, findings))
    resumed = {role: list(run.resumed_changes) for role, run in (("baseline", baseline), ("current", current))
               if run.resumed_changes}
    return Verdict(baseline.info, current.info, _identity(current.environment, "gpu_name"), cases, env_changes,
                   fail_on_improvement or rules.fail_on_improvement, list(host.differences), resumed)


def compare_runs(baseline_dir: str | Path, current_dir: str | Path, rules: GateRules | None = None,
                 allow_env_change: bool = False, fail_on_improvement: bool = False) -> Verdict:
    """Compare two run directories; raises CompareError for input problems (the CLI's exit code 2)."""
    return compare(load_run(baseline_dir, "baseline"), load_run(current_dir, "current"), rules, allow_env_change,
                   fail_on_improvement)
