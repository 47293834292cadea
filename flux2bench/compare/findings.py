"""How the gate decides one metric of one case (see ``flux2bench.compare`` for the method)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from pydantic import BaseModel
from scipy.stats import mannwhitneyu

from flux2bench.compare.rules import CompareError, DriftRule, GateRules, LatencyRule, MemoryRule
from flux2bench.compare.verdict import REPORTED_SUFFIX, Decision, Finding, unit_suffix
from flux2bench.metrics import GATE_PHASE, case_host_bound, gated, peak, spread, worker_start
from flux2bench.results import CaseResult, Status


def _directional(worse: bool, better: bool, large: bool) -> Decision:
    if worse:
        return "regression"
    if better:
        return "large_improvement" if large else "improvement"
    return "pass"


def samples_needed(alpha: float) -> int:
    """The fewest samples per side for which the exact one-sided Mann-Whitney U test can reach ``alpha``."""
    n = 1
    while 1 / math.comb(2 * n, n) > alpha:
        n += 1
    return n


@dataclass(frozen=True)
class Host:
    """Whether the two runs' hosts match on what host-bound metrics depend on (see host_differences)."""

    differences: tuple[str, ...] = ()

    @property
    def matches(self) -> bool:
        return not self.differences


def _reported(metric: str, why: str, b: float | None = None, c: float | None = None) -> Finding:
    change = c / b - 1 if b and c is not None else None
    return Finding(metric, "reported", f"{why}{REPORTED_SUFFIX}", b, c, change,
                   None if b is None or c is None else c - b)


# Same-code reruns of scenarios/smoke.yaml on a 2-core machine shared with other work differed by up to 50x in
# s/step (reports/gate-cpu-20261126): a CPU case's timings measure the host's other load as much as the code.
CPU_TIMINGS = "ran on the CPU, whose timings follow the host's other load as much as the code"


def latency_finding(metric: str, baseline: list[float], current: list[float], rule: LatencyRule,
                    host_bound: bool = False) -> Finding:
    """Decide one latency metric from raw samples (see ``flux2bench.compare`` for the method)."""
    if not baseline or not current:
        side = "baseline" if not baseline else "current"
        return Finding(metric, "skipped", f"no latency samples in the {side} run")
    impossible = [(side, s) for side, samples in (("baseline", baseline), ("current", current)) for s in samples
                  if not (math.isfinite(s) and s > 0)]
    if impossible:
        side, sample = impossible[0]
        raise CompareError(f"cannot compare {metric}: the {side} run has a sample of {sample} s, which no timing gives")
    b, c = statistics.median(baseline), statistics.median(current)
    change = c / b - 1
    noise = spread(baseline) or None
    t = max(rule.host_threshold if host_bound else rule.threshold, spread(baseline))
    n = f"n={len(baseline)} vs {len(current)}"
    if abs(change) <= t:
        return Finding(metric, "pass", f"median within ±{t:.0%} ({n})", b, c, change, c - b, noise)
    if 1 / math.comb(len(baseline) + len(current), len(baseline)) <= rule.alpha:
        p = mannwhitneyu(current, baseline, alternative="greater" if change > 0 else "less").pvalue
        decided = p <= rule.alpha
        test = (f"median beyond ±{t:.0%}, Mann-Whitney U one-sided p={p:.2g} {'<=' if decided else '>'} "
                f"{rule.alpha:g} ({n})" + ("" if decided else ": noise could explain it; more repeats would decide"))
    else:
        gross = rule.gross
        decided = min(current) > max(baseline) * (1 + gross) if change > 0 else max(current) < min(baseline) * (1 - gross)
        test = (f"{n}: too few samples for Mann-Whitney at alpha={rule.alpha:g} (needs {samples_needed(rule.alpha)} "
                "per side); " + (f"every sample differs by more than {gross:.0%}, far beyond noise" if decided
                                 else f"samples not all {gross:.0%} apart: undecided"))
    decision = _directional(change > 0, change < 0, change < -rule.large_improvement) if decided else "inconclusive"
    return Finding(metric, decision, test, b, c, change, c - b, noise)


def _median(samples: list[float]) -> float | None:
    return statistics.median(samples) if samples else None


def _not_measured(metric: str, result: CaseResult, side: str) -> str | None:
    if GATE_PHASE not in result.memory:
        return f"{side}: no {GATE_PHASE} memory record"
    value = peak(result, metric, GATE_PHASE)
    return None if value.value is not None else f"{side}: {value.reason or 'not measured'}"


def _gate_peak(result: CaseResult, metric: str) -> float | None:
    return peak(result, metric, GATE_PHASE).value


def memory_finding(metric: str, baseline: CaseResult, current: CaseResult, rule: MemoryRule) -> Finding:
    reasons = [r for r in (_not_measured(metric, baseline, "baseline"), _not_measured(metric, current, "current")) if r]
    if reasons:
        return Finding(metric, "skipped", "not compared; " + "; ".join(reasons))
    b, c = _gate_peak(baseline, metric), _gate_peak(current, metric)
    delta = c - b
    change = delta / b if b else math.copysign(math.inf, delta) if delta else 0.0
    test = f"{GATE_PHASE}-phase peaks; a change counts beyond both {rule.threshold:.0%} and {rule.floor_gib:g} GiB"
    decision = _directional(change > rule.threshold and delta > rule.floor_gib,
                            -change > rule.threshold and -delta > rule.floor_gib, -change > rule.large_improvement)
    return Finding(metric, decision, test, b, c, change, delta)


def drift_finding(metric: str, baseline: CaseResult, current: CaseResult, rule: DriftRule) -> Finding:
    values = [r.drift.metrics.get(metric) if r.drift else None for r in (baseline, current)]
    missing = [side for side, m in zip(("baseline", "current"), values) if m is None or m.value is None]
    if missing:
        return Finding(metric, "skipped", f"not measured in the {' and '.join(missing)} run")
    b, c = values[0].value, values[1].value
    delta = c - b
    test = f"a change counts beyond {rule.max_drop:g}{unit_suffix(metric)}"
    decision = _directional(-delta > rule.max_drop, delta > rule.max_drop, large=False)
    return Finding(metric, decision, test, b, c, delta=delta)


def _status_rank(status: Status) -> int:
    ranked = (Status.OK, Status.DRIFT_FAIL)
    return ranked.index(status) if status in ranked else len(ranked)


def _why(result: CaseResult) -> str:
    """Why a case failed, in one line (a traceback's last line names its exception)."""
    text = (result.reason or result.error or "").strip()
    return f": {text.splitlines()[-1]}" if text else ""


def status_finding(baseline: CaseResult, current: CaseResult) -> Finding:
    b, c = _status_rank(baseline.status), _status_rank(current.status)
    decision = _directional(c > b, c < b, large=False)
    why = _why(current) if c > b else ""
    return Finding("status", decision, f"status {baseline.status} → {current.status}{why}", baseline.status, current.status)


def compare_case(baseline: CaseResult, current: CaseResult, rules: BaseModel, host: Host = Host()) -> list[Finding]:
    """All findings of one case present in both runs; host-bound metrics are gated only where the hosts match."""
    findings = [status_finding(baseline, current)]
    if not (baseline.status.ran and current.status.ran):
        return findings
    other_host = f"host-bound and the hosts differ ({'; '.join(host.differences)})"
    for spec in gated("latency"):
        rule, samples = getattr(rules, spec.name), spec.samples
        if not rule.enabled:
            continue
        host_bound = spec.host_bound or case_host_bound(current)
        medians = [_median(samples(side)) for side in (baseline, current)]
        if current.setup.device == "cpu":
            findings.append(_reported(spec.name, CPU_TIMINGS, *medians))
        elif host_bound and not host.matches:
            findings.append(_reported(spec.name, other_host, *medians))
        else:
            findings.append(latency_finding(spec.name, samples(baseline), samples(current), rule, host_bound))
    starts = [worker_start(side) for side in (baseline, current)]
    other_start = (f"host RAM and the workers started differently ({starts[0]} against {starts[1]}): a forked worker's "
                   "RSS leaves out library pages only the fork server touched")
    for spec in gated("memory"):
        if not getattr(rules, spec.name).enabled:
            continue
        if spec.host_bound and not host.matches:
            findings.append(_reported(spec.name, other_host, _gate_peak(baseline, spec.name), _gate_peak(current, spec.name)))
        elif spec.host_bound and starts[0] != starts[1]:
            findings.append(_reported(spec.name, other_start, _gate_peak(baseline, spec.name),
                                      _gate_peak(current, spec.name)))
        else:
            findings.append(memory_finding(spec.name, baseline, current, getattr(rules, spec.name)))
    if baseline.drift or current.drift:
        findings += [drift_finding(spec.name, baseline, current, getattr(rules, spec.name))
                     for spec in gated("drift") if getattr(rules, spec.name).enabled]
    return findings + profile_findings(baseline, current)


def profile_findings(baseline: CaseResult, current: CaseResult) -> list[Finding]:
    """Where the profiled step went on both sides, per category group (ms in the step), where both cases were
    profiled: one profiled step per case, so reported, never gated."""
    steps = [r.profile.step if r.profile else None for r in (baseline, current)]
    if steps[0] is None or steps[1] is None:
        return []
    groups = dict.fromkeys(c.group for step in steps for c in step.categories)
    return [_reported(f"profiled step: {group} ms", "one profiled step per case", steps[0].group_ms(group),
                      steps[1].group_ms(group)) for group in groups]


def missing_finding(result: CaseResult, missing_from: str, rules: GateRules) -> Finding:
    """A case only one run has: missing from the current run (a regression, unless the rules only report it), or
    new in it (not gated: there is nothing to compare it with)."""
    if missing_from == "baseline":
        return Finding("status", "new", "case new in the current run (not in the baseline run)", None, result.status)
    fails = rules.missing_case == "regression"
    return Finding("status", "regression" if fails else "missing", "case missing from the current run",
                   result.status, None)
