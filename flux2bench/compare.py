"""The regression gate: compare a current run with a baseline run, case by case, metric by metric.

Cases are matched by their stable case key, never by order. Each metric of each case gets a
``Finding`` whose decision is one of:

* ``pass``: no change beyond the metric's threshold;
* ``regression``: worse beyond the threshold (fails the gate);
* ``improvement``: better beyond the threshold;
* ``large_improvement``: better beyond the rule's ``large_improvement``; fails the gate only with
  ``fail_on_improvement``, since an unexplained large speed-up often means the work was skipped;
* ``missing``: the case is absent from one side (a case absent from the *current* run is a
  regression unless the rules say ``missing_case: report``);
* ``skipped``: not measured on one side, with the reason.

How each kind of metric is decided:

* status: ranked ok < drift_fail < everything else (oom, host_oom, timeout, error, unsupported);
  a worse rank is a regression (so ``ok`` → ``oom`` always fails), a better one an improvement.
  The other metrics are compared only when both sides ran (ok or drift_fail).
* latency (``s_per_image``, ``s_per_step``): from the raw samples, one per timed image (for
  s/step, the median of that image's steps, so that samples sharing one image's clocks and
  thermal state count once). A regression needs both a median slowdown beyond ``threshold`` and a
  one-sided Mann-Whitney U test with p <= ``alpha``; deciding on medians and ranks means one slow
  outlier can fail neither. The threshold sets what change matters; the test only vetoes changes
  that noise could explain, so ``alpha`` defaults to 0.10: at 0.05, with 5 repeats, a single slow
  outlier in the *baseline* would hide a real slowdown (p = 0.075). When the sample sizes cannot
  reach ``alpha`` at all (the exact test's smallest p is 1 / C(n1 + n2, n1): 2 vs 2, 1 vs 8),
  the conservative range rule applies: a regression needs every current sample slower than every
  baseline sample by more than the threshold (min(current) > max(baseline) * (1 + threshold)),
  an improvement the mirror. Within-run repeats do not capture drift between runs (clocks,
  thermals, other tenants): the relative threshold is what absorbs it. Use 5 or more repeats:
  with 3, one slow baseline outlier is enough to leave a real slowdown undecided (a pass).
* memory (inference-phase peaks of GPU allocated, reserved, device and host RSS): nearly
  deterministic, so no test; a regression needs the growth to exceed both ``threshold`` (relative)
  and ``floor_gib`` (absolute). Skipped, with the reason, when not measured on either side.
* drift (``psnr``, ``ssim``, each case against its run's bf16 baseline image): a regression when
  the value drops by more than ``max_drop`` (dB for PSNR) from the baseline run's value.

Runs from different GPU models are never compared; runs whose driver, CUDA or library versions
differ only with ``allow_env_change`` (the differences are then listed in the verdict).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from scipy.stats import mannwhitneyu

from flux2bench.results import CaseResult, RunStore
from flux2bench.trackers.environment import GPU_IDENTITY, SOFTWARE_IDENTITY

Decision = Literal["pass", "regression", "improvement", "large_improvement", "missing", "skipped"]
# A case's decision is the first of these that any of its findings has.
_SEVERITY: tuple[Decision, ...] = ("regression", "large_improvement", "missing", "improvement", "pass", "skipped")
RAN = ("ok", "drift_fail")
MEMORY_METRICS = ("gpu_allocated_peak_gib", "gpu_reserved_peak_gib", "gpu_device_peak_gib", "host_rss_peak_gib")
DRIFT_METRICS = ("psnr", "ssim")
UNITS = {"s_per_image": " s", "s_per_step": " s", "psnr": " dB", "ssim": ""} | {m: " GiB" for m in MEMORY_METRICS}


class CompareError(Exception):
    """An input problem (missing run, unreadable rules, incomparable environments); the message is for the user."""


# --------------------------------------------------------------------------------------------- rules
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LatencyRule(_Strict):
    enabled: bool = True
    threshold: float = Field(0.05, ge=0, description="relative change of the median that counts")
    alpha: float = Field(0.10, gt=0, lt=1, description="significance level of the one-sided Mann-Whitney U test")
    large_improvement: float = Field(0.25, gt=0, description="relative speed-up that counts as suspiciously large")


class MemoryRule(_Strict):
    enabled: bool = True
    threshold: float = Field(0.02, ge=0, description="relative change that counts")
    floor_gib: float = Field(0.25, ge=0, description="absolute change (GiB) that counts")
    large_improvement: float = Field(0.25, gt=0, description="relative saving that counts as suspiciously large")


class DriftRule(_Strict):
    enabled: bool = True
    max_drop: float = Field(ge=0, description="largest allowed drop from the baseline run's value")


class MetricRules(_Strict):
    """The rule of every gated metric, as it applies to one block."""

    s_per_image: LatencyRule = LatencyRule()
    s_per_step: LatencyRule = LatencyRule()
    gpu_allocated_peak_gib: MemoryRule = MemoryRule()
    gpu_reserved_peak_gib: MemoryRule = MemoryRule()
    gpu_device_peak_gib: MemoryRule = MemoryRule()
    host_rss_peak_gib: MemoryRule = MemoryRule(floor_gib=0.5)
    psnr: DriftRule = DriftRule(max_drop=1.0)
    ssim: DriftRule = DriftRule(max_drop=0.01)


Overrides = dict[str, dict[str, Any]]


def _merged(base: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    return {**base, **{metric: {**base.get(metric, {}), **fields} for metric, fields in overrides.items()}}


def _error_lines(err: ValidationError, prefix: str = "") -> list[str]:
    return [f"{prefix}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]


class GateRules(_Strict):
    """The gate's rules: ``defaults`` and ``blocks.<name>`` override some fields of some metrics.

    A block's rules are the built-in ones, then ``defaults``, then that block's overrides::

        fail_on_improvement: false     # also fail on large improvements
        missing_case: regression       # or report
        defaults:
          s_per_image: {threshold: 0.05, alpha: 0.10}
          gpu_reserved_peak_gib: {threshold: 0.02, floor_gib: 0.25}
        blocks:
          offload:
            s_per_image: {threshold: 0.10}
            host_rss_peak_gib: {enabled: false}
    """

    defaults: Overrides = {}
    blocks: dict[str, Overrides] = {}
    fail_on_improvement: bool = False
    missing_case: Literal["regression", "report"] = "regression"

    @model_validator(mode="after")
    def _overrides_are_valid(self) -> GateRules:
        errors = []
        for scope, overrides in [("defaults", self.defaults)] + [(f"blocks.{b}", o) for b, o in self.blocks.items()]:
            try:
                MetricRules.model_validate(_merged(MetricRules().model_dump(), overrides))
            except ValidationError as err:
                errors += _error_lines(err, f"{scope}.")
        if errors:
            raise PydanticCustomError("gate_rules", "{detail}", {"detail": "; ".join(errors)})
        return self

    def for_block(self, block: str) -> MetricRules:
        merged = _merged(_merged(MetricRules().model_dump(), self.defaults), self.blocks.get(block, {}))
        return MetricRules.model_validate(merged)


def load_rules(path: str | Path) -> GateRules:
    """Read a gate.yaml; any problem (missing file, bad YAML, unknown key, bad value) is a CompareError."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CompareError(f"cannot read gate rules {path}: {exc}") from exc
    try:
        return GateRules.model_validate(data)
    except ValidationError as err:
        raise CompareError(f"invalid gate rules {path}:\n  " + "\n  ".join(_error_lines(err))) from err


# ------------------------------------------------------------------------------------------ findings
@dataclass
class Finding:
    """One metric of one case: both values, the change, the decision and how it was reached."""

    metric: str
    decision: Decision
    test: str
    baseline: float | str | None = None
    current: float | str | None = None
    change: float | None = None  # relative: current / baseline - 1
    delta: float | None = None  # absolute: current - baseline


@dataclass
class CaseReport:
    key: str
    label: str
    block: str
    findings: list[Finding]

    @property
    def decision(self) -> Decision:
        decisions = {f.decision for f in self.findings}
        return next(d for d in _SEVERITY if d in decisions)


@dataclass
class RunInfo:
    path: str
    run_id: str | None
    created_at: str | None


@dataclass
class Verdict:
    baseline: RunInfo
    current: RunInfo
    gpu: str | None
    cases: list[CaseReport]
    env_changes: list[str] = field(default_factory=list)
    fail_on_improvement: bool = False

    def _fails(self, finding: Finding) -> bool:
        return finding.decision == "regression" or (self.fail_on_improvement and finding.decision == "large_improvement")

    def failures(self) -> list[tuple[CaseReport, Finding]]:
        return [(case, f) for case in self.cases for f in case.findings if self._fails(f)]

    @property
    def exit_code(self) -> int:
        return 1 if self.failures() else 0

    @property
    def decision(self) -> str:
        return "regression" if self.exit_code else "pass"

    def counts(self) -> dict[str, int]:
        decisions = [case.decision for case in self.cases]
        return {d: decisions.count(d) for d in _SEVERITY if d in decisions}

    def to_json(self) -> str:
        data = {"decision": self.decision, "exit_code": self.exit_code, "counts": self.counts(), **asdict(self)}
        for case, report in zip(data["cases"], self.cases):
            case["decision"] = report.decision
        return json.dumps(_json_safe(data), indent=1)

    def markdown(self) -> str:
        counts = ", ".join(f"{n} {d.replace('_', ' ')}" for d, n in self.counts().items())
        icon = "❌" if self.exit_code else "✅"
        lines = [f"### {icon} flux2bench gate: {self.decision}", "",
                 f"Baseline `{self.baseline.run_id}` → current `{self.current.run_id}` on {self.gpu or 'no GPU'}: "
                 f"{len(self.cases)} cases ({counts}).", ""]
        if self.env_changes:
            lines += [f"> **Environment changed** (compared anyway, `--allow-env-change`): {'; '.join(self.env_changes)}", ""]
        sections = [
            ("Failing", self.failures(), False),
            ("Improvements", [(c, f) for c in self.cases for f in c.findings
                              if f.decision in ("improvement", "large_improvement") and not self._fails(f)], True),
            ("Missing cases", [(c, f) for c in self.cases for f in c.findings if f.decision == "missing"], False),
        ]
        for title, rows, with_decision in sections:
            if rows:
                lines += [f"#### {title}", "", *_table(rows, with_decision), ""]
        lines += ["<details><summary>All cases</summary>", "", *_case_table(self.cases), "",
                  "— : not compared (not measured in one of the runs; the JSON verdict says why).", "", "</details>"]
        return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    """JSON without the non-standard Infinity (the relative change of a peak that was zero is infinite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _format_value(value: float | str | None, metric: str) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else f"{value:.4g}{UNITS.get(metric, '')}"


def _format_change(finding: Finding) -> str:
    if finding.metric in DRIFT_METRICS and finding.delta is not None:
        return f"{finding.delta:+.3g}{UNITS[finding.metric]}"
    return f"{finding.change:+.1%}" if finding.change is not None else ""


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _table(rows: list[tuple[CaseReport, Finding]], with_decision: bool = False) -> list[str]:
    head = ["Case", "Metric", *(["Decision"] if with_decision else []), "Baseline", "Current", "Change", "How decided"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for case, f in rows:
        cells = [f"{case.label} (`{case.key}`)", f.metric, *([f.decision] if with_decision else []),
                 _format_value(f.baseline, f.metric), _format_value(f.current, f.metric), _format_change(f), f.test]
        lines.append(_row(cells))
    return lines


def _cell(finding: Finding | None) -> str:
    if finding is None or finding.decision == "skipped":
        return "—"
    change = _format_change(finding)
    return change if finding.decision == "pass" else f"{change} {finding.decision.replace('_', ' ')}"


def _case_table(cases: list[CaseReport]) -> list[str]:
    """One row per case (a pull-request comment must stay short): the status and each metric's change."""
    metrics = [*LATENCY_SAMPLES, *MEMORY_METRICS, *DRIFT_METRICS]
    head = ["Case", "Decision", "Status", *metrics]
    lines = [_row(head), "|" + "---|" * len(head)]
    for case in cases:
        found = {f.metric: f for f in case.findings}
        status = found["status"]
        statuses = " → ".join(dict.fromkeys(_format_value(s, "status") for s in (status.baseline, status.current)))
        cells = [f"{case.label} (`{case.key}`)", case.decision.replace("_", " "), statuses,
                 *(_cell(found.get(m)) for m in metrics)]
        lines.append(_row(cells))
    return lines


# ------------------------------------------------------------------------------------------- metrics
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
    test = f"a change counts beyond {rule.max_drop:g}{UNITS[metric]}"
    decision = _directional(-delta > rule.max_drop, delta > rule.max_drop, large=False)
    return Finding(metric, decision, test, b, c, delta=delta)


def _status_rank(status: str) -> int:
    return RAN.index(status) if status in RAN else len(RAN)


def _why(result: CaseResult) -> str:
    """Why a case failed, in one line (a traceback's last line names its exception)."""
    text = (result.reason or result.error or "").strip()
    return f": {text.splitlines()[-1]}" if text else ""


def status_finding(baseline: CaseResult, current: CaseResult) -> Finding:
    b, c = _status_rank(baseline.status), _status_rank(current.status)
    decision = _directional(c > b, c < b, large=False)
    why = _why(current) if c > b else ""
    return Finding("status", decision, f"status {baseline.status} → {current.status}{why}", baseline.status, current.status)


def compare_case(baseline: CaseResult, current: CaseResult, rules: MetricRules) -> list[Finding]:
    """All findings of one case present in both runs."""
    findings = [status_finding(baseline, current)]
    if baseline.status not in RAN or current.status not in RAN:
        return findings
    for metric, samples in LATENCY_SAMPLES.items():
        rule = getattr(rules, metric)
        if rule.enabled:
            findings.append(latency_finding(metric, samples(baseline), samples(current), rule))
    findings += [memory_finding(m, baseline, current, getattr(rules, m)) for m in MEMORY_METRICS
                 if getattr(rules, m).enabled]
    if baseline.drift or current.drift:
        findings += [drift_finding(m, baseline, current, getattr(rules, m)) for m in DRIFT_METRICS
                     if getattr(rules, m).enabled]
    return findings


def _missing_finding(result: CaseResult, missing_from: str, rules: GateRules) -> Finding:
    fails = missing_from == "current" and rules.missing_case == "regression"
    status = (result.status, None) if missing_from == "current" else (None, result.status)
    return Finding("status", "regression" if fails else "missing", f"case missing from the {missing_from} run", *status)


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """A loaded run directory: its run.json and its records by case key, in scenario order."""

    info: RunInfo
    environment: dict[str, Any]
    results: dict[str, CaseResult]


def load_run(path: str | Path, role: str) -> Run:
    try:
        store = RunStore.open(path)
        meta = store.meta
    except (OSError, ValueError) as exc:
        raise CompareError(f"{role} run: {exc}") from exc
    results = {}
    for record in sorted(store.results_dir.glob("*.json")):
        try:
            results[record.stem] = CaseResult.from_json(record.read_text())
        except (OSError, ValueError) as exc:
            raise CompareError(f"{role} run: unreadable result record {record}: {str(exc).splitlines()[0]}") from exc
    if not results:
        raise CompareError(f"{role} run {path} has no case results")
    order = {key: i for i, key in enumerate(meta.get("case_keys", []))}
    ordered = dict(sorted(results.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))
    info = RunInfo(str(path), meta.get("run_id"), meta.get("created_at"))
    return Run(info, meta.get("environment") or {}, ordered)


def _identity(environment: dict[str, Any], name: str) -> Any:
    return environment[name] if name in environment else (environment.get("versions") or {}).get(name)


def _differences(baseline: dict[str, Any], current: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    pairs = [(name, _identity(baseline, name), _identity(current, name)) for name in names]
    return [f"{name} {b} → {c}" for name, b, c in pairs if b != c]


def check_environments(baseline: Run, current: Run, allow_env_change: bool) -> list[str]:
    """The software differences that were allowed; raises CompareError for any that is not."""
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
    env_changes = check_environments(baseline, current, allow_env_change)
    cases = []
    for key in dict.fromkeys([*baseline.results, *current.results]):
        b, c = baseline.results.get(key), current.results.get(key)
        either = b or c
        if b and c:
            findings = compare_case(b, c, rules.for_block(c.block))
        else:
            findings = [_missing_finding(either, "current" if b else "baseline", rules)]
        cases.append(CaseReport(key, either.label, either.block, findings))
    return Verdict(baseline.info, current.info, _identity(current.environment, "gpu_name"), cases, env_changes,
                   fail_on_improvement or rules.fail_on_improvement)


def compare_runs(baseline_dir: str | Path, current_dir: str | Path, rules: GateRules | None = None,
                 allow_env_change: bool = False, fail_on_improvement: bool = False) -> Verdict:
    """Compare two run directories; raises CompareError for input problems (the CLI's exit code 2)."""
    return compare(load_run(baseline_dir, "baseline"), load_run(current_dir, "current"), rules, allow_env_change,
                   fail_on_improvement)
