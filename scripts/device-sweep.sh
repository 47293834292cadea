#!/usr/bin/env bash
# One device call on a multi-GPU host: the announcement-post scenario and the H100 sweep side by side,
# each spreading its cases over its own GPUs (run --devices). Resumable: a run directory already in
# /tmp/runs (a warm machine) or in ./carried-runs (copied in after a cold start) is continued.
#   BLOG_DEVICES, SWEEP_DEVICES   GPUs of each scenario (default 0 and 1,2,3)
#   SWEEP_PHASES                  blocks of the sweep to run first, e.g. "reference-images,resolution;emulated-cards"
#                                 (phases separated by ';', blocks by ','); default: every block in one phase
#   BUDGET                        seconds before both runners are stopped (a stopped case is rerun on resume)
#   TAR_EXCLUDE                   extra tar --exclude patterns for what comes back (space-separated)
# Run directories come back through $OUT as a split tarball, without prompt-embedding caches.
set -u
export PYTHONPATH=/tmp/site:$PWD/.whl-bnb:$PWD PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${BUDGET:-540}))
mkdir -p /tmp/runs
if [ -z "$(ls /tmp/runs)" ] && [ -d carried-runs ]; then cp -r carried-runs/. /tmp/runs/; fi
nvidia-smi -L > "$OUT/gpus.txt"; nvidia-smi topo -m >> "$OUT/gpus.txt"; free -g >> "$OUT/gpus.txt"

run_or_resume() {  # SCENARIO DEVICES [BLOCKS]
  local IFS=$' \t\n' name dir blocks=()
  name=$(basename "$1" .yaml)
  [ -n "${3:-}" ] && for b in ${3//,/ }; do blocks+=(--block "$b"); done
  dir=$(ls -d /tmp/runs/"$name"-* 2>/dev/null | tail -1)
  if [ -n "$dir" ]; then set -- --resume "$dir" "$2"; else set -- "$1" --out /tmp/runs "$2"; fi
  timeout $((deadline - SECONDS)) python3 -m flux2bench.cli run "$@" "${blocks[@]}" --no-report >> "$OUT/$name.log" 2>&1
}
run_or_resume scenarios/blog-flux2.yaml "--devices=${BLOG_DEVICES:-0}" &
(IFS=';'; for phase in ${SWEEP_PHASES:-""}; do
   run_or_resume scenarios/h100.yaml "--devices=${SWEEP_DEVICES:-1,2,3}" "$phase"; done) &
wait
excludes=(--exclude='*/embeddings'); for p in ${TAR_EXCLUDE:-}; do excludes+=(--exclude="$p"); done
cd /tmp/runs && tar czf - "${excludes[@]}" . | split -b 15M - "$OUT/runs.tgz.part-"
ls -la "$OUT"
