"""How the gate decides one metric of one case (see ``flux2bench.compare`` for the method)."""

from __future__ import annotations

import math
import statistics

from pydantic import BaseModel
from scipy.stats import mannwhitneyu

from flux2bench.compare.rules import DriftRule, GateRules, LatencyRule, MemoryRule
from flux2bench.compare.verdict import Decision, Finding, unit_suffix
from flux2bench.metrics import gated
from flux2bench.results import CaseResult, Status


def _directional(worse: bool, better: bool, large: bool) -> Decision:
    if worse:
        return "regression"
    if better:
        return "large_improvement" if large else "improvement"
    return "pass"


def _image_samples(result: CaseResult) -> list[float]:
    return list(result.latency.stages.get("image", [])) if result.latency else []


def _step_samples(result: CaseResult) -> list[float]:
    return [statistics.median(image) for image in result.latency.steps if image] if result.latency else []


LATENCY_SAMPLES = {"s_per_image": _image_samples, "s_per_step": _step_samples}


def latency_finding(metric: str, baseline: list[float], current: list[float], rule: LatencyRule) -> Finding:
    """Decide one latency metric from raw samples (see the module docstring for the method)."""
    if not baseline or not current:
        side = "baseline" if not baseline else "current"
        return Finding(metric, "skipped", f"no latency samples in the {side} run")
    b, c = statistics.median(baseline), statistics.median(current)
    change, t = c / b - 1, rule.threshold
    n = f"n={len(baseline)} vs {len(current)}"
    if abs(change) <= t:
        beyond, test = False, f"median within ±{t:.0%} ({n})"
    elif 1 / math.comb(len(baseline) + len(current), len(baseline)) > rule.alpha:
        beyond = min(current) > max(baseline) * (1 + t) if change > 0 else max(current) < min(baseline) * (1 - t)
        test = (f"range rule ({n}: too few for Mann-Whitney at alpha={rule.alpha:g}): samples "
                + (f"separated by more than {t:.0%}" if beyond else f"overlap within {t:.0%}"))
    else:
        p = mannwhitneyu(current, baseline, alternative="greater" if change > 0 else "less").pvalue
        beyond = p <= rule.alpha
        test = f"median beyond ±{t:.0%}, Mann-Whitney U one-sided p={p:.2g} {'<=' if beyond else '>'} {rule.alpha:g} ({n})"
    decision = _directional(beyond and change > 0, beyond and change < 0, change < -rule.large_improvement)
    return Finding(metric, decision, test, b, c, change, c - b)


def _not_measured(metric: str, result: CaseResult, side: str) -> str | None:
    memory = result.memory.get("inference")
    if memory is None:
        return f"{side}: no inference memory record"
    value = getattr(memory, metric)
    return None if value.value is not None else f"{side}: {value.reason or 'not measured'}"


def memory_finding(metric: str, baseline: CaseResult, current: CaseResult, rule: MemoryRule) -> Finding:
    reasons = [r for r in (_not_measured(metric, baseline, "baseline"), _not_measured(metric, current, "current")) if r]
    if reasons:
        return Finding(metric, "skipped", "not compared; " + "; ".join(reasons))
    b, c = baseline.peak(metric), current.peak(metric)
    delta = c - b
    change = delta / b if b else math.copysign(math.inf, delta) if delta else 0.0
    test = f"a change counts beyond both {rule.threshold:.0%} and {rule.floor_gib:g} GiB"
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


def compare_case(baseline: CaseResult, current: CaseResult, rules: BaseModel) -> list[Finding]:
    """All findings of one case present in both runs."""
    findings = [status_finding(baseline, current)]
    if not (baseline.status.ran and current.status.ran):
        return findings
    for metric, samples in LATENCY_SAMPLES.items():
        rule = getattr(rules, metric)
        if rule.enabled:
            findings.append(latency_finding(metric, samples(baseline), samples(current), rule))
    findings += [memory_finding(spec.name, baseline, current, getattr(rules, spec.name))
                 for spec in gated("memory") if getattr(rules, spec.name).enabled]
    if baseline.drift or current.drift:
        findings += [drift_finding(spec.name, baseline, current, getattr(rules, spec.name))
                     for spec in gated("drift") if getattr(rules, spec.name).enabled]
    return findings


def missing_finding(result: CaseResult, missing_from: str, rules: GateRules) -> Finding:
    fails = missing_from == "current" and rules.missing_case == "regression"
    status = (result.status, None) if missing_from == "current" else (None, result.status)
    return Finding("status", "regression" if fails else "missing", f"case missing from the {missing_from} run", *status)
