"""Measure the regression gate itself: its false-positive rate over repeated runs of the same code, and its
detection rate of a known slowdown, at the scenario's repeats and at fewer.

    python scripts/measure_gate.py scenarios/ci.yaml --same 6 --slowed 6 --out runs/gate
    python scripts/measure_gate.py --analyse runs/gate          # again, from the run directories alone

Runs the scenario ``--same`` times with the normal worker and, for each ``--kinds`` (host, gpu), ``--slowed`` times
with scripts/gate_slow_worker.py (every denoising step ``--slowdown`` slower: a host-side sleep, or a GPU kernel
queued on the step's stream), then compares every pair of same-code runs (a failing verdict is a false positive)
and every (same, slowed) pair (a failing verdict is a detection), and counts, per metric, the pairs in which that
metric alone was a regression. Same-code pairs also count how often the gate judged the hosts to match (host-bound
metrics are gated only then). The same comparisons are repeated on the first r timed images of every run, for each
r, to show how many repeats the gate needs. Writes ``gate-measurement.json`` and ``gate-measurement.md`` into the
output folder.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
from collections import Counter
from pathlib import Path

from flux2bench.compare import compare, load_run
from flux2bench.runner import Runner, SupervisorConfig, resume_run, start_run

HERE = Path(__file__).resolve().parent


def run_scenario(scenario: Path, run_dir: Path, slowdown: float | None, kind: str = "host") -> None:
    """Run (or finish, after an interruption) one measurement run; the runner skips the cases already recorded."""
    store, cases = resume_run(run_dir) if (run_dir / "run.json").exists() else start_run(scenario, run_dir=run_dir)
    if slowdown is None:
        Runner(store).run(cases)
        return
    os.environ["FLUX2BENCH_SLOWDOWN"] = str(slowdown)
    os.environ["FLUX2BENCH_SLOWDOWN_KIND"] = kind
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    Runner(store, SupervisorConfig(worker_module="gate_slow_worker")).run(cases)


def first_images(run, repeats: int):
    """The run as if it had timed only its first ``repeats`` images."""
    trimmed = copy.deepcopy(run)
    for result in trimmed.results.values():
        if result.latency:
            result.latency.stages = {stage: samples[:repeats] for stage, samples in result.latency.stages.items()}
            result.latency.steps = result.latency.steps[:repeats]
    return trimmed


def failing(baseline, current) -> dict:
    verdict = compare(baseline, current, allow_env_change=True)
    failures = verdict.failures()
    return {"baseline": baseline.info.run_id, "current": current.info.run_id, "exit_code": verdict.exit_code,
            "failures": [f"{case.key} {f.metric} {f.decision} ({f.test})" for case, f in failures],
            "metrics": sorted({f.metric for _, f in failures}), "same_host": not verdict.host_differences,
            "counts": verdict.counts()}


def slowed_runs(out: Path) -> dict[str, list[Path]]:
    """The slowed run directories by kind (``slowed-N`` from before the GPU-side kind count as host)."""
    legacy = [p for p in out.glob("slowed-*") if p.name.removeprefix("slowed-").isdigit()]
    return {"host": sorted(legacy + list(out.glob("slowed-host-*"))), "gpu": sorted(out.glob("slowed-gpu-*"))}


def analyse(out: Path) -> dict:
    same = [load_run(p, "same") for p in sorted(out.glob("same-*"))]
    slowed = {kind: [load_run(p, "slowed") for p in paths] for kind, paths in slowed_runs(out).items() if paths}
    every = same + [run for runs in slowed.values() for run in runs]
    images = min(len(r.latency.stages.get("image", [])) for run in every for r in run.results.values() if r.latency)
    by_repeats = {}
    for repeats in range(1, images + 1):
        s = [first_images(run, repeats) for run in same]
        same_pairs = [failing(a, b) for a, b in itertools.permutations(s, 2)]
        row = {"false_positives": sum(p["exit_code"] for p in same_pairs), "same_code_pairs": len(same_pairs),
               "same_host_pairs": sum(p["same_host"] for p in same_pairs),
               "false_positive_examples": [p for p in same_pairs if p["exit_code"]][:3], "slowed": {}}
        for kind, runs in slowed.items():
            w = [first_images(run, repeats) for run in runs]
            pairs = [failing(a, b) for a, b in itertools.product(s, w)]
            row["slowed"][kind] = {
                "detections": sum(p["exit_code"] for p in pairs), "slowed_pairs": len(pairs),
                "by_metric": dict(Counter(metric for p in pairs for metric in p["metrics"])),
                "missed_examples": [p for p in pairs if not p["exit_code"]][:3],
            }
        by_repeats[repeats] = row
    return {"same_runs": [r.info.run_id for r in same],
            "slowed_runs": {kind: [r.info.run_id for r in runs] for kind, runs in slowed.items()},
            "by_repeats": by_repeats}


def markdown(measurement: dict, slowdown: str) -> str:
    """The table docs/gate.md quotes: per timed-image count, false positives, same-host judgements, and
    per slowdown kind the detections overall and per metric (pairs in which that metric was a regression)."""
    kinds = list(measurement["slowed_runs"])
    metrics = sorted({m for row in measurement["by_repeats"].values() for kind in kinds
                      for m in row["slowed"][kind]["by_metric"]})
    header = ["timed images per case", "false positives / same-code pairs", "hosts judged the same / same-code pairs"]
    header += [f"{kind}-side {slowdown}: detections / pairs" for kind in kinds]
    header += [f"{kind}-side {slowdown}: {metric}" for kind in kinds for metric in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for repeats, row in measurement["by_repeats"].items():
        cells = [str(repeats), f"{row['false_positives']} / {row['same_code_pairs']}",
                 f"{row['same_host_pairs']} / {row['same_code_pairs']}"]
        cells += [f"{row['slowed'][k]['detections']} / {row['slowed'][k]['slowed_pairs']}" for k in kinds]
        cells += [f"{row['slowed'][k]['by_metric'].get(m, 0)} / {row['slowed'][k]['slowed_pairs']}"
                  for k in kinds for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    slowed = "; ".join(f"{kind}-side: {', '.join(runs)}" for kind, runs in measurement["slowed_runs"].items())
    head = (f"Same-code runs: {', '.join(measurement['same_runs'])}. Runs with every step {slowdown} slower "
            f"({slowed}). Ordered pairs: each same-code run against every other one, and each same-code run "
            "against every slowed run; a pair counts when `flux2bench compare` exits 1, and under a metric when "
            "that metric was a regression in it.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", type=Path)
    parser.add_argument("--same", type=int, default=6)
    parser.add_argument("--slowed", type=int, default=6)
    parser.add_argument("--slowdown", type=float, default=0.10)
    parser.add_argument("--kinds", default="host,gpu", help="slowdowns to run: host (a sleep), gpu (a kernel)")
    parser.add_argument("--out", type=Path, default=Path("runs/gate"))
    parser.add_argument("--analyse", type=Path, help="only analyse the run directories already in this folder")
    args = parser.parse_args(argv)
    out = args.analyse or args.out
    if args.analyse is None:
        for i in range(1, max(args.same, args.slowed) + 1):  # interleaved, so that drift over time hits both
            if i <= args.same:
                run_scenario(args.scenario, out / f"same-{i}", None)
            for kind in args.kinds.split(",") if i <= args.slowed else ():
                run_scenario(args.scenario, out / f"slowed-{kind}-{i}", args.slowdown, kind)
    measurement = analyse(out)
    measurement["slowdown"] = args.slowdown
    (out / "gate-measurement.json").write_text(json.dumps(measurement, indent=1))
    text = markdown(measurement, f"{args.slowdown:.0%}")
    (out / "gate-measurement.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
