"""The gate's verdict: findings per metric and case, the exit code, and the JSON and Markdown summaries."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from flux2bench.metrics import BY_NAME, gated

Decision = Literal["pass", "regression", "improvement", "large_improvement", "inconclusive", "missing", "new",
                   "reported", "skipped"]
# A case's decision is the first of these that any of its findings has.
_SEVERITY: tuple[Decision, ...] = ("regression", "large_improvement", "missing", "inconclusive", "improvement",
                                   "pass", "new", "reported", "skipped")
REPORTED_SUFFIX = ": reported, not gated"  # ends the ``test`` of every ``reported`` finding, after its reason
GATED_METRICS = tuple(spec.name for kind in ("latency", "memory", "drift") for spec in gated(kind))


def unit_suffix(metric: str) -> str:
    unit = BY_NAME[metric].unit if metric in BY_NAME else ""
    return f" {unit}" if unit else ""


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
    noise: float | None = None  # relative: the baseline run's own spread of this metric (timings with 2+ samples)


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
    host_differences: list[str] = field(default_factory=list)  # host-bound metrics are then reported, not gated
    # by role, how the sessions that resumed the run differ in versions from the one that created it
    resumed_changes: dict[str, list[str]] = field(default_factory=dict)

    def _fails(self, finding: Finding) -> bool:
        return finding.decision == "regression" or (self.fail_on_improvement and finding.decision == "large_improvement")

    def reported(self) -> list[tuple[CaseReport, Finding]]:
        return [(case, f) for case in self.cases for f in case.findings if f.decision == "reported"]

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
                 f"{plural(len(self.cases), 'case')} ({counts}).", ""]
        if self.env_changes:
            lines += [f"> **Environment changed** (compared anyway, `--allow-env-change`): {'; '.join(self.env_changes)}", ""]
        if self.resumed_changes:
            runs = "; ".join(f"{role} run: {', '.join(changes)}" for role, changes in self.resumed_changes.items())
            lines += [f"> **Resumed under other versions** ({runs}): a record does not say which session measured "
                      "it, so some cases may have run under the other versions.", ""]
        if self.host_differences:
            lines += [f"> **Other host** ({'; '.join(self.host_differences)}): host-bound metrics (loading, offload, "
                      "CPU timings, host RSS) are reported, not gated.", ""]
        reported = self.reported()
        sections = [  # title, the reasons under the title, the rows, whether each row shows its decision
            ("Failing", [], self.failures(), False),
            ("Improvements", [], [(c, f) for c in self.cases for f in c.findings
                                  if f.decision in ("improvement", "large_improvement") and not self._fails(f)], True),
            ("Inconclusive (too few samples or too much noise to decide; not failing)", [],
             [(c, f) for c in self.cases for f in c.findings if f.decision == "inconclusive"], False),
            ("Missing cases", [], [(c, f) for c in self.cases for f in c.findings if f.decision == "missing"], False),
            ("New cases (not in the baseline run; nothing to compare them with)", [],
             [(c, f) for c in self.cases for f in c.findings if f.decision == "new"], False),
            ("Reported, not gated", _why_reported(reported), reported, False),
        ]
        for title, why, rows, with_decision in sections:
            if rows:
                lines += [f"#### {title}", "", *why, *_table(rows, with_decision), ""]
        lines += ["<details><summary>All cases</summary>", "", *_case_table(self.cases), "",
                  "— : not compared (not measured in one of the runs; the JSON verdict says why).", "", "</details>"]
        return "\n".join(lines) + "\n"


def _why_reported(rows: list[tuple[CaseReport, Finding]]) -> list[str]:
    """Why reported findings are not gated, each distinct reason once (CPU timings, hosts that differ, workers
    started differently): the findings' own reasons, never a fixed one that may not apply."""
    reasons = dict.fromkeys(f.test.removesuffix(REPORTED_SUFFIX) for _, f in rows)
    return [f"Why: {'; '.join(reasons)}.", ""]


def _json_safe(value: Any) -> Any:
    """JSON without the non-standard Infinity (the relative change of a peak that was zero is infinite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def rounded(value: float, metric: str, noise: float | None = None) -> str:
    """A value to the digits its noise allows: a timing to the decimal of its run's spread, a registry metric to the
    report's format, anything else to 4 significant digits."""
    if noise and value:
        decimals = max(0, -math.floor(math.log10(abs(value) * noise)))
        return f"{value:.{decimals}f}"
    return BY_NAME[metric].text(value) if metric in BY_NAME else f"{value:.4g}"


def _format_value(value: float | str | None, metric: str, noise: float | None = None) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else f"{rounded(value, metric, noise)}{unit_suffix(metric)}"


def _format_change(finding: Finding) -> str:
    if finding.metric in BY_NAME and BY_NAME[finding.metric].kind == "drift" and finding.delta is not None:
        return f"{finding.delta:+.3g}{unit_suffix(finding.metric)}"
    return f"{finding.change:+.1%}" if finding.change is not None else ""


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _table(rows: list[tuple[CaseReport, Finding]], with_decision: bool = False) -> list[str]:
    head = ["Case", "Metric", *(["Decision"] if with_decision else []), "Baseline", "Current", "Change", "How decided"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for case, f in rows:
        cells = [f"{case.label} (`{case.key}`)", f.metric, *([f.decision] if with_decision else []),
                 _format_value(f.baseline, f.metric, f.noise), _format_value(f.current, f.metric, f.noise),
                 _format_change(f), f.test]
        lines.append(_row(cells))
    return lines


def _cell(finding: Finding | None) -> str:
    if finding is None or finding.decision == "skipped":
        return "—"
    change = _format_change(finding)
    return change if finding.decision == "pass" else f"{change} {finding.decision.replace('_', ' ')}"


def _case_table(cases: list[CaseReport]) -> list[str]:
    """One row per case (a pull-request comment must stay short): the status and each metric's change."""
    metrics = GATED_METRICS
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
