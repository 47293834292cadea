#!/usr/bin/env bash
# One device call on a multi-GPU host: the announcement-post scenario and the H100 sweep side by side,
# each spreading its cases over its own GPUs (run --devices). Resumable: a run directory already in
# /tmp/runs (a warm machine), else those named in SEED_RUNS (default ./carried-runs/*, e.g. committed
# reports/ directories), are continued.
#   BLOG_DEVICES, SWEEP_DEVICES   GPUs of each scenario (default 0 and 1,2,3; set to empty to skip one)
#   GPU_TESTS, GPU_TESTS_DEVICE   pytest arguments run with -m gpu on that GPU (default 0) alongside
#   SWEEP_PHASES                  blocks of the sweep to run first, e.g. "reference-images,resolution;emulated-cards"
#                                 (phases separated by ';', blocks by ','); default: every block in one phase
#   BUDGET                        seconds before both runners are stopped (a stopped case is rerun on resume)
#   TAR_EXCLUDE                   extra tar --exclude patterns for what comes back (space-separated)
# Run directories come back through $OUT as a split tarball, without prompt-embedding caches.
set -u
export PYTHONPATH=/tmp/site:$PWD/.whl-bnb:$PWD PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${BUDGET:-540}))
mkdir -p /tmp/runs
if [ -z "$(ls /tmp/runs)" ]; then for dir in ${SEED_RUNS:-carried-runs/*}; do
  [ -d "$dir" ] && cp -r "$dir" /tmp/runs/; done; fi
nvidia-smi -L > "$OUT/gpus.txt"; nvidia-smi topo -m >> "$OUT/gpus.txt"; free -g >> "$OUT/gpus.txt"

run_or_resume() {  # SCENARIO DEVICES [BLOCKS]
  local IFS=$' \t\n' name dir blocks=()
  name=$(basename "$1" .yaml)
  [ -n "${3:-}" ] && for b in ${3//,/ }; do blocks+=(--block "$b"); done
  dir=$(ls -d /tmp/runs/"$name"-* 2>/dev/null | tail -1)
  if [ -n "$dir" ]; then set -- --resume "$dir" "$2"; else set -- "$1" --out /tmp/runs "$2"; fi
  timeout $((deadline - SECONDS)) python3 -m flux2bench.cli run "$@" "${blocks[@]}" --no-report >> "$OUT/$name.log" 2>&1
}
[ -n "${GPU_TESTS:-}" ] && CUDA_VISIBLE_DEVICES=${GPU_TESTS_DEVICE:-0} timeout $((deadline - SECONDS)) \
  python3 -m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS > "$OUT/gpu-tests.log" 2>&1 &
[ -n "${BLOG_DEVICES-0}" ] && run_or_resume scenarios/blog-flux2.yaml "--devices=${BLOG_DEVICES-0}" &
[ -n "${SWEEP_DEVICES-1,2,3}" ] && (IFS=';'; for phase in ${SWEEP_PHASES:-""}; do
   [ $SECONDS -lt $deadline ] && run_or_resume scenarios/h100.yaml "--devices=${SWEEP_DEVICES-1,2,3}" "$phase"; done) &
wait
excludes=(--exclude='*/embeddings'); for p in ${TAR_EXCLUDE:-}; do excludes+=(--exclude="$p"); done
cd /tmp/runs && tar czf - "${excludes[@]}" . | split -b 15M - "$OUT/runs.tgz.part-"
ls -la "$OUT"
