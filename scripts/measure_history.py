"""Measure flux2bench history on one machine: does it find creeping steps that pairwise compare misses, and does a
same-code history stay free of change points?

    python scripts/measure_history.py scenarios/ci.yaml --out reports/history-ci-h200-YYYYMMDD --budget-s 540
    python scripts/measure_history.py scenarios/ci.yaml --out reports/history-ci-h200-YYYYMMDD   # again: resumes
    python scripts/measure_history.py --analyse reports/history-ci-h200-YYYYMMDD   # from the run directories alone
    bash scripts/device-session.sh "history=scenarios/ci.yaml"   # the runs alone, on a device machine

Makes two series of runs of the scenario, interleaved so that drift over time reaches both: ``steps/run-NN`` (runs
1-10 unchanged, then every denoising step ``--step`` slower from run 11 and twice that from run 16, through
scripts/gate_slow_worker.py, GPU-side by default) and ``same/run-NN`` (unchanged). Every run shares one artifact
cache, so the prompt embeddings are made once. Resumable: a complete run directory is skipped, an incomplete one
resumed; ``--budget-s`` starts no new run after that many seconds (a device command's limit), so two calls finish
the 32 runs. Runs' images and latents are deleted once a run is complete (the records keep what was measured).

The analysis (needs Apache Otava: pip install 'flux2bench[history]') runs ``flux2bench history`` on each series
(history.md, history.html, history.json in ``steps-history/`` and ``same-history/``), reruns it on the first k runs
for every k (when each change point was first found, and whether ``history --gate`` failed with run k as the
newest), compares each run with its predecessor (``flux2bench compare``: what a gate against the last run sees), and
writes ``history-measurement.json`` and ``history-measurement.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flux2bench.artifact_cache import ArtifactCache, cache_root
from flux2bench.compare import CompareError, compare, load_run
from flux2bench.runner import WORKER_MODULE, Runner, SupervisorConfig, resume_run, start_run
from flux2bench.store import RunStore

HERE = Path(__file__).resolve().parent
SERIES = ("steps", "same")


@dataclass(frozen=True)
class Planned:
    series: str
    number: int
    slowdown: float  # every denoising step this fraction slower (0: the normal worker)

    def path(self, out: Path) -> Path:
        return out / self.series / f"run-{self.number:02d}"

    @property
    def label(self) -> str:
        return f"steps {self.slowdown:.0%} slower" if self.slowdown else "unchanged"


def plan(steps: int, same: int, step: float, starts: tuple[int, ...]) -> list[Planned]:
    """The runs in the order they are made: the two series interleaved."""
    runs = []
    for number in range(1, max(steps, same) + 1):
        if number <= steps:
            runs.append(Planned("steps", number, step * sum(number >= start for start in starts)))
        if number <= same:
            runs.append(Planned("same", number, 0.0))
    return runs


def complete(run_dir: Path) -> bool:
    if not (run_dir / "run.json").exists():
        return False
    store = RunStore.open(run_dir)
    return bool(store.records().valid) and not store.incomplete()


def run_one(scenario: Path, planned: Planned, out: Path, kind: str, cache: ArtifactCache) -> None:
    """Make (or finish) one run; the runner skips the cases already recorded."""
    run_dir = planned.path(out)
    if (run_dir / "run.json").exists():
        store, cases = resume_run(run_dir)
    else:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        store, cases = start_run(scenario, run_dir=run_dir, label=planned.label)
    module = WORKER_MODULE
    if planned.slowdown:
        os.environ |= {"FLUX2BENCH_SLOWDOWN": str(planned.slowdown), "FLUX2BENCH_SLOWDOWN_KIND": kind,
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
        module = "gate_slow_worker"
    Runner(store, SupervisorConfig(worker_module=module, cache=cache.root)).run(cases)
    if complete(run_dir):
        for bulky in ("images", "latents"):
            shutil.rmtree(run_dir / bulky, ignore_errors=True)


def measure(scenario: Path, out: Path, runs: list[Planned], kind: str, budget_s: float | None,
            cache: ArtifactCache) -> bool:
    """Make the planned runs not yet complete, in order; False when the budget stopped it first."""
    started = time.monotonic()
    for planned in runs:
        if complete(planned.path(out)):
            continue
        if budget_s is not None and time.monotonic() - started > budget_s:
            return False
        print(f"{planned.path(out)}: {planned.label}", flush=True)
        run_one(scenario, planned, out, kind, cache)
    return True


def run_dirs(out: Path, series: str) -> list[Path]:
    return sorted(p for p in (out / series).glob("run-*") if complete(p))


def pairwise(paths: list[Path]) -> list[dict]:
    """Each run compared with its predecessor, as a gate against the last run would."""
    pairs = []
    for before, after in zip(paths, paths[1:]):
        try:
            verdict = compare(load_run(before, "baseline"), load_run(after, "current"))
        except CompareError as exc:  # e.g. a run resumed on another GPU model
            pairs.append({"baseline": before.name, "current": after.name, "exit_code": 2, "regressions": [str(exc)],
                          "s_per_step_change": None})
            continue
        changes = {f.metric: f.change for case in verdict.cases for f in case.findings if f.metric == "s_per_step"}
        pairs.append({"baseline": before.name, "current": after.name, "exit_code": verdict.exit_code,
                      "regressions": [f"{c.key} {f.metric} ({f.test})" for c, f in verdict.failures()],
                      "s_per_step_change": changes.get("s_per_step")})
    return pairs


def by_prefix(paths: list[Path]) -> list[dict]:
    """``history --gate`` with each run as the newest: its exit code and the change points it knew of then."""
    from flux2bench.history import MIN_POINTS, build_history

    rows = []
    for k in range(MIN_POINTS, len(paths) + 1):
        history = build_history(paths[:k])
        rows.append({"runs": k, "gate_exit_code": history.exit_code,
                     "change_points": [f"{a.series.metric} at run {p.run} ({p.decision})"
                                       for a in history.analysed for p in a.change_points]})
    return rows


def analyse_series(out: Path, series: str) -> dict:
    from flux2bench.history import build_history, write_history

    paths = run_dirs(out, series)
    history = build_history(paths)
    target = out / f"{series}-history"
    write_history(history, target)
    (target / "history.json").write_text(history.to_json())
    points = [{"case": a.series.case_key, "metric": a.series.metric, "run": p.run,
               "label": history.runs[p.run - 1].code, "before": p.before, "after": p.after, "change": p.change,
               "pvalue": p.pvalue, "decision": p.decision, "found_with_runs_at_new_level": p.found_with}
              for a in history.analysed for p in a.change_points]
    pairs = pairwise(paths)
    return {"runs": [p.name for p in paths], "labels": [r.code for r in history.runs],
            "gpu": history.runs[-1].gpu, "change_points": points, "gate_by_newest_run": by_prefix(paths),
            "pairwise": pairs, "pairwise_flagged": sum(p["exit_code"] for p in pairs)}


def markdown(summary: dict) -> str:
    lines = [f"Runs on {summary['steps']['gpu'] or 'no GPU'}; `flux2bench history` (Apache Otava, p <= 0.001) on each "
             "series, and `flux2bench compare` of each run against its predecessor.", ""]
    for series in SERIES:
        data = summary[series]
        lines += [f"### {series}: {len(data['runs'])} runs ({', '.join(dict.fromkeys(data['labels']))})", "",
                  "| metric | starts at run | code there | median before → after | change | p | decision | found "
                  "with runs at the new level |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {p['metric']} | {p['run']} | {p['label']} | {p['before']:.4g} → {p['after']:.4g} | "
                  f"{p['change']:+.1%} | {p['pvalue']:.2g} | {p['decision']} | {p['found_with_runs_at_new_level']} |"
                  for p in data["change_points"]] or ["| (no change point) | | | | | | | |"]
        failing = [row["runs"] for row in data["gate_by_newest_run"] if row["gate_exit_code"]]
        flagged = [f"{p['baseline']} → {p['current']}" for p in data["pairwise"] if p["exit_code"]]
        lines += ["", f"`history --gate` with run k as the newest failed for k = {failing or 'none'}.",
                  f"Pairwise `compare` of each run against its predecessor flagged {data['pairwise_flagged']} of "
                  f"{len(data['pairwise'])} pairs{': ' + ', '.join(flagged) if flagged else ''}; s/step changes "
                  + ", ".join(f"{p['current']} {p['s_per_step_change']:+.1%}" for p in data["pairwise"]
                              if p["s_per_step_change"] is not None) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/history"))
    parser.add_argument("--steps", type=int, default=20, help="runs in the series with steps")
    parser.add_argument("--same", type=int, default=12, help="runs in the same-code series")
    parser.add_argument("--step", type=float, default=0.03, help="each step's slowdown, a fraction of a step")
    parser.add_argument("--starts", default="11,16", help="the runs where a step starts")
    parser.add_argument("--kind", default="gpu", help="gpu (a kernel on the step's stream) or host (a sleep)")
    parser.add_argument("--budget-s", type=float, help="start no new run after this many seconds")
    parser.add_argument("--cache", type=Path, help="artifact cache shared by every run (default: $FLUX2BENCH_CACHE, "
                                                   "else ~/.cache/flux2bench)")
    parser.add_argument("--analyse", type=Path, help="only analyse the run directories already in this folder")
    parser.add_argument("--runs-only", action="store_true", help="make the runs, not the analysis (a GPU host "
                                                                  "without Apache Otava; --analyse later elsewhere)")
    args = parser.parse_args(argv)
    out = args.analyse or args.out
    if args.analyse is None:
        runs = plan(args.steps, args.same, args.step, tuple(int(s) for s in args.starts.split(",")))
        cache = ArtifactCache(cache_root(args.cache) or Path.home() / ".cache" / "flux2bench")
        if not measure(args.scenario, out, runs, args.kind, args.budget_s, cache):
            left = sum(not complete(p.path(out)) for p in runs)
            print(f"budget spent with {left} runs to make: run the same command again to resume")
            return 0
        if args.runs_only:
            print(f"all {len(runs)} runs made: measure_history.py --analyse {out}")
            return 0
    from flux2bench.history import HistoryError

    try:
        summary = {series: analyse_series(out, series) for series in SERIES}
    except HistoryError as exc:
        print(f"the runs are made; the analysis could not run here ({exc}): measure_history.py --analyse {out} "
              "where it can", file=sys.stderr)
        return 2
    (out / "history-measurement.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (out / "history-measurement.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
