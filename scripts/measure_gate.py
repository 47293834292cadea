"""Measure the regression gate itself: its false-positive rate over repeated runs of the same code, and its
detection rate of a known slowdown, at the scenario's repeats and at fewer.

    python scripts/measure_gate.py scenarios/ci.yaml --same 6 --slowed 6 --out runs/gate
    python scripts/measure_gate.py --analyse runs/gate          # again, from the run directories alone

Runs the scenario ``--same`` times with the normal worker and ``--slowed`` times with scripts/gate_slow_worker.py
(every denoising step ``--slowdown`` slower), then compares every pair of same-code runs (a failing verdict is a
false positive) and every (same, slowed) pair (a failing verdict is a detection). The same comparisons are
repeated on the first r timed images of every run, for each r, to show how many repeats the gate needs. Writes
``gate-measurement.json`` and ``gate-measurement.md`` into the output folder.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
from pathlib import Path

from flux2bench.compare import compare, load_run
from flux2bench.runner import Runner, resume_run, start_run

HERE = Path(__file__).resolve().parent


def run_scenario(scenario: Path, run_dir: Path, slowdown: float | None) -> None:
    """Run (or finish, after an interruption) one measurement run; the runner skips the cases already recorded."""
    store, cases = resume_run(run_dir) if (run_dir / "run.json").exists() else start_run(scenario, run_dir=run_dir)
    if slowdown is None:
        Runner(store).run(cases)
        return
    os.environ["FLUX2BENCH_SLOWDOWN"] = str(slowdown)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    Runner(store, worker_module="gate_slow_worker").run(cases)


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
    return {"baseline": baseline.info.run_id, "current": current.info.run_id, "exit_code": verdict.exit_code,
            "failures": [f"{case.key} {f.metric} {f.decision} ({f.test})" for case, f in verdict.failures()],
            "counts": verdict.counts()}


def analyse(out: Path) -> dict:
    same = [load_run(p, "same") for p in sorted(out.glob("same-*"))]
    slowed = [load_run(p, "slowed") for p in sorted(out.glob("slowed-*"))]
    images = min(len(r.latency.stages.get("image", [])) for run in same + slowed for r in run.results.values()
                 if r.latency)
    by_repeats = {}
    for repeats in range(1, images + 1):
        s = [first_images(run, repeats) for run in same]
        w = [first_images(run, repeats) for run in slowed]
        same_pairs = [failing(a, b) for a, b in itertools.permutations(s, 2)]
        slowed_pairs = [failing(a, b) for a, b in itertools.product(s, w)]
        by_repeats[repeats] = {
            "false_positives": sum(p["exit_code"] for p in same_pairs), "same_code_pairs": len(same_pairs),
            "detections": sum(p["exit_code"] for p in slowed_pairs), "slowed_pairs": len(slowed_pairs),
            "false_positive_examples": [p for p in same_pairs if p["exit_code"]][:3],
            "missed_examples": [p for p in slowed_pairs if not p["exit_code"]][:3],
        }
    return {"same_runs": [r.info.run_id for r in same], "slowed_runs": [r.info.run_id for r in slowed],
            "by_repeats": by_repeats}


def markdown(measurement: dict, slowdown: str) -> str:
    lines = ["| timed images per case | false positives / same-code pairs | detections / slowed pairs |",
             "|---|---|---|"]
    for repeats, row in measurement["by_repeats"].items():
        lines.append(f"| {repeats} | {row['false_positives']} / {row['same_code_pairs']} | "
                     f"{row['detections']} / {row['slowed_pairs']} |")
    head = (f"Same-code runs: {', '.join(measurement['same_runs'])}. Runs with every step {slowdown} slower: "
            f"{', '.join(measurement['slowed_runs'])}. Ordered pairs: each same-code run against every other one, "
            "and each same-code run against every slowed run; a pair counts when `flux2bench compare` exits 1.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", type=Path)
    parser.add_argument("--same", type=int, default=6)
    parser.add_argument("--slowed", type=int, default=6)
    parser.add_argument("--slowdown", type=float, default=0.10)
    parser.add_argument("--out", type=Path, default=Path("runs/gate"))
    parser.add_argument("--analyse", type=Path, help="only analyse the run directories already in this folder")
    args = parser.parse_args(argv)
    out = args.analyse or args.out
    if args.analyse is None:
        for i in range(1, max(args.same, args.slowed) + 1):  # interleaved, so that drift over time hits both
            if i <= args.same:
                run_scenario(args.scenario, out / f"same-{i}", None)
            if i <= args.slowed:
                run_scenario(args.scenario, out / f"slowed-{i}", args.slowdown)
    measurement = analyse(out)
    measurement["slowdown"] = args.slowdown
    (out / "gate-measurement.json").write_text(json.dumps(measurement, indent=1))
    text = markdown(measurement, f"{args.slowdown:.0%}")
    (out / "gate-measurement.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
