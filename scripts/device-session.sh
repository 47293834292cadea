#!/usr/bin/env bash
# One device call, made of lanes of steps that run until BUDGET seconds have passed; what was made comes back through
# $OUT (run directories as a split tarball, logs beside it). Resumable: run directories stay in /tmp/runs on a warm
# machine, and a scenario step continues the newest run directory of its scenario there.
#   bash scripts/device-session.sh LANE [LANE ...]
# Work longer than one call runs detached, from a copy of the tree, while the machine stays held: --detach starts the
# lanes (BUDGET counts from then) and returns; each later call's --collect [SECONDS] waits that long (default 540) or
# until the lanes end, then brings back what is there so far (run again to follow; the lanes go on meanwhile).
#   BUDGET=1500 bash scripts/device-session.sh --detach LANE [LANE ...]
#   bash scripts/device-session.sh --collect 540
# Lanes run at the same time (give them different GPUs); a lane is steps joined by '+', run in order.
# Steps:
#   seed=PATH                      a run directory (e.g. reports/RUN) or a .tar.xz of run directories (images a
#                                  resumed run needs) put into /tmp/runs, unless that run is there already
#   gpu-tests[=PYTEST_ARGS]        python -m pytest -m gpu (the tiny pipeline on the GPU)
#   gate=SCENARIO:SAME:SLOWED      scripts/measure_gate.py into /tmp/runs/gate-<scenario>
#   history=SCENARIO[:STEPS:SAME]  scripts/measure_history.py --runs-only into /tmp/runs/history-<scenario>, starting
#                                  no run in the last 90 s (resumable: again, or seed its folder; --analyse here)
#   fa3=WHEEL                      install a FlashAttention-3 wheel, check it against SDPA (pytest -m gpu -k fa3)
#                                  and put it on PYTHONPATH
#   fa4=DIR                        install FlashAttention-4 from a folder of wheels, check it against SDPA (pytest -m
#                                  gpu -k fa4) and put it on PYTHONPATH
#   run=SCENARIO[:DEVICES[:BLOCKS]] flux2bench run (or --resume) SCENARIO; DEVICES like 0,1,2,3; BLOCKS a,b
#   again=SCENARIO[:DEVICES[:BLOCKS]] the same in a new run directory under /tmp/runs/again (a second run over the
#                                  same cache, $FLUX2BENCH_CACHE, default /tmp/f2b-cache: compiled code is loaded)
#   wait=PATH[:SECONDS]            wait until PATH exists (a later call puts it there), at most SECONDS (default 600)
#   wheels=DIR                     install the wheels in DIR into /tmp/site too: wheels that did not fit the first
#                                  call's carry (64 MiB with the tree), put there by a later call before its wait=
#   drop-checkpoints=GLOB          delete the on-disk checkpoints in $FLUX2BENCH_CHECKPOINTS matching GLOB, to free
#                                  the disk for the next block's (bf16 FLUX.2-dev, 105 GiB, and the NF4 one, 62 GiB,
#                                  do not fit a 128 GiB disk together)
# Environment: BUDGET (seconds, default 560); WITH_IMAGES=1 brings images and latents back too (they are large).
# Example, two scenarios side by side on a four-GPU host, the first resuming a committed run:
#   bash scripts/device-session.sh "seed=reports/consumer-20261126-234826+run=scenarios/consumer.yaml:0,1,2" \
#     "run=scenarios/blog-flux2.yaml:3:ram-caps,nf4-ram-cap"
set -u
DETACHED_OUT=/tmp/session-out
bring_back() {  # the run directories so far, as a split tarball in $OUT
  local excludes=(--exclude='*/embeddings' --exclude='*/compile-cache' --exclude='*/tmp' --exclude='*/.lock')
  [ -n "${WITH_IMAGES:-}" ] || excludes+=(--exclude='*/images' --exclude='*/latents')
  (cd /tmp/runs && tar czf - "${excludes[@]}" . | split -b 15M - "$OUT/runs.tgz.part-")
  ls -la "$OUT"
}
case "${1:-}" in
  --detach)
    shift; rm -rf "$DETACHED_OUT" /tmp/session-repo; mkdir -p "$DETACHED_OUT" /tmp/runs
    cp -a . /tmp/session-repo  # the next call's copy of the tree may replace files under a running job
    cd /tmp/session-repo && OUT=$DETACHED_OUT DETACHED=1 setsid nohup bash scripts/device-session.sh "$@" \
      > "$DETACHED_OUT/detached.log" 2>&1 < /dev/null &
    echo "detached: collect with bash scripts/device-session.sh --collect SECONDS"; exit 0 ;;
  --collect)
    for _ in $(seq $((${2:-540} / 5))); do [ -e "$DETACHED_OUT/done" ] && break; sleep 5; done
    cp "$DETACHED_OUT"/*.log "$DETACHED_OUT"/*.txt "$OUT"/ 2>/dev/null
    [ -e "$DETACHED_OUT/done" ] && echo "the lanes have ended" || echo "the lanes go on"
    bring_back; exit 0 ;;
esac
deadline=$((SECONDS + ${BUDGET:-560}))
export PYTHONPATH=/tmp/site:$PWD/.whl-bnb:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export FLUX2BENCH_CACHE=${FLUX2BENCH_CACHE:-/tmp/f2b-cache}
mkdir -p /tmp/runs
left() { echo $((deadline - SECONDS)); }
log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/session.log"; }
{ nvidia-smi -L; nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm --format=csv; nproc;
  nvidia-smi topo -m; free -g; df -h /tmp; grep cgroup /proc/mounts; cat /sys/fs/cgroup/cgroup.controllers; } > "$OUT/machine.txt" 2>&1
# max_ram_gib needs a cgroup v2 hierarchy: mount one where the VM has none (flux2bench.cgroup delegates memory)
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup >> "$OUT/machine.txt" 2>&1

step_seed() {
  case "$1" in
    *.tar.xz) tar xJf "$1" -C /tmp/runs --skip-old-files ;;
    *) [ -d "/tmp/runs/$(basename "$1")" ] || cp -r "$1" /tmp/runs/ ;;
  esac
}
step_gpu_tests() { timeout "$(left)" python3 -m pytest -q -m gpu -p no:cacheprovider ${1:-tests} > "$OUT/gpu-tests.log" 2>&1; }
step_gate() {
  local scenario same slowed; IFS=: read -r scenario same slowed <<< "$1"
  timeout "$(left)" python3 scripts/measure_gate.py "$scenario" --same "${same:-5}" --slowed "${slowed:-5}" \
    --out "/tmp/runs/gate-$(basename "$scenario" .yaml)" > "$OUT/gate-$(basename "$scenario" .yaml).log" 2>&1
}
step_history() {
  local scenario steps same name; IFS=: read -r scenario steps same <<< "$1"; name=$(basename "$scenario" .yaml)
  timeout "$(left)" python3 scripts/measure_history.py "$scenario" --steps "${steps:-20}" --same "${same:-12}" \
    --runs-only --budget-s $(($(left) - 90)) --out "/tmp/runs/history-$name" >> "$OUT/history-$name.log" 2>&1
}
step_fa3() {  # a FlashAttention-3 wheel (docs/attention.md), used only if it agrees with SDPA
  rm -rf /tmp/fa3-site
  python3 -m pip install -q --no-deps --no-index --target /tmp/fa3-site "$1" > "$OUT/fa3.log" 2>&1 &&
    PYTHONPATH=/tmp/fa3-site:$PYTHONPATH python3 -c "import flash_attn_interface" >> "$OUT/fa3.log" 2>&1 &&
    PYTHONPATH=/tmp/fa3-site:$PYTHONPATH python3 -m pytest -q -m gpu -p no:cacheprovider -k fa3 \
      tests/axes/test_gpu_pipeline.py tests/axes/test_recipe_gpu.py >> "$OUT/fa3.log" 2>&1 &&
    export PYTHONPATH=/tmp/fa3-site:$PYTHONPATH
}
step_fa4() {  # FlashAttention-4: the wheels in folder DIR (flash-attn-4 and those it needs that the machine lacks; a
  # wheel may also come unpacked, as a .tar.xz split in parts DIR/*.part-*, joined in name order), used only if the
  # tiny pipeline's FA4 case agrees with SDPA (pytest -m gpu -k fa4). nvidia-cutlass-dsl's .pth file, which Python
  # reads in site directories only, puts its dsl_packages folder on sys.path: here PYTHONPATH does.
  local site=/tmp/fa4-site:/tmp/fa4-site/nvidia_cutlass_dsl/dsl_packages
  rm -rf /tmp/fa4-site; mkdir -p /tmp/fa4-site
  python3 -m pip install -q --no-deps --no-index --target /tmp/fa4-site "$1"/*.whl > "$OUT/fa4.log" 2>&1 &&
    { ! compgen -G "$1/*.part-*" > /dev/null || cat "$1"/*.part-* | tar xJf - -C /tmp/fa4-site; } &&
    PYTHONPATH=$site:$PYTHONPATH python3 -m pytest -q -rs -m gpu -p no:cacheprovider -k fa4 \
      tests/axes/test_recipe_gpu.py >> "$OUT/fa4.log" 2>&1 &&
    export PYTHONPATH=$site:$PYTHONPATH
}
step_run() {
  local scenario devices blocks name dir args=(); IFS=: read -r scenario devices blocks <<< "$1"
  name=$(basename "$scenario" .yaml)
  dir=$(ls -d /tmp/runs/"$name"-2* 2>/dev/null | tail -1)
  if [ -n "$dir" ] && [ -z "${AGAIN:-}" ]; then args=(--resume "$dir")
  else mkdir -p "/tmp/runs${AGAIN:+/again}"; args=("$scenario" --out "/tmp/runs${AGAIN:+/again}"); fi
  [ -n "${devices:-}" ] && args+=(--devices "$devices")
  for b in ${blocks//,/ }; do args+=(--block "$b"); done
  timeout "$(left)" python3 -m flux2bench run "${args[@]}" --no-report >> "$OUT/$name.log" 2>&1
}

step_wait() {
  local path seconds; IFS=: read -r path seconds <<< "$1"
  for _ in $(seq "${seconds:-600}"); do [ -e "$path" ] && return 0; sleep 1; done; return 1
}
step_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$1"/*.whl \
    >> "$OUT/wheels.log" 2>&1
}
step_again() { AGAIN=1 step_run "$1"; }
step_drop_checkpoints() { rm -rf "${FLUX2BENCH_CHECKPOINTS:?}"/$1; df -h "$FLUX2BENCH_CHECKPOINTS" >> "$OUT/machine.txt"; }

run_lane() {
  local step name arg
  for step in ${1//+/ }; do
    [ "$(left)" -gt 20 ] || { log "out of time before $step"; return; }
    name=${step%%=*}; arg=${step#*=}; [ "$arg" = "$step" ] && arg=""
    log "start $step"; "step_${name//-/_}" "$arg"; log "end $step (exit $?)"
  done
}

for lane in "$@"; do run_lane "$lane" & done
wait
if [ -n "${DETACHED:-}" ]; then touch "$OUT/done"; else bring_back | tee -a "$OUT/session.log"; fi
