"""Trim a profiler trace (Chrome JSON, gzip) to its profiled step, to commit it with its run directory: the step span,
the events that overlap it, and only the fields flux2bench.profiling.steps reads (the committed traces under
reports/*/profiles were trimmed so; tests/profiling/test_steps.py reads each back).

    python scripts/trim_trace.py RUN_DIR/profiles/KEY.trace.json.gz OUT.trace.json.gz
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from flux2bench.profiling.steps import read_trace, step_span

KEPT_ARGS = ("correlation", "stream", "bytes", "Input type")


def trim(events: list[dict]) -> list[dict]:
    _, start, end = step_span(events)
    kept = []
    for event in events:
        if event.get("ph") != "X" or "dur" not in event:
            continue
        if float(event["ts"]) + float(event["dur"]) < start or float(event["ts"]) > end:
            continue
        args = {name: value for name, value in (event.get("args") or {}).items() if name in KEPT_ARGS}
        kept.append({key: event[key] for key in ("ph", "cat", "name", "pid", "tid", "ts", "dur") if key in event}
                    | {"args": args})
    return kept


def main(source: str, target: str) -> None:
    events = trim(read_trace(Path(source))["traceEvents"])
    with gzip.open(target, "wt") as f:
        json.dump({"traceEvents": events}, f, separators=(",", ":"))
    print(f"{target}: {len(events)} events")


if __name__ == "__main__":
    main(*sys.argv[1:])
