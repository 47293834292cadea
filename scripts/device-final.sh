#!/usr/bin/env bash
# One device call: the regression-gate demo (three tiny runs, the last with an injected slowdown),
# then the announcement-post scenario until the time left runs out; run directories go to $OUT.
set -u
start=$SECONDS
export PYTHONPATH=/tmp/site:$PWD/.whl-bnb:$PWD PYTHONUNBUFFERED=1
run() { python3 -m flux2bench.cli run "$@" --out /tmp/runs --no-report 2>&1 | grep -v "it/s\]"; }
run scenarios/ci.yaml
run scenarios/ci.yaml
CUDA_LAUNCH_BLOCKING=1 run scenarios/ci.yaml   # the injected slowdown: every kernel launch synchronous
timeout $((${BUDGET:-500} - (SECONDS - start))) bash -c "$(declare -f run); run scenarios/blog-flux2.yaml"
cd /tmp/runs && tar czf - . | split -b 15M - "$OUT/runs.tgz.part-"
ls -la "$OUT"
