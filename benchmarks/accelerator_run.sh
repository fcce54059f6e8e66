#!/usr/bin/env bash
# The benchmarks on a lent accelerator host that has jax, flax, optax and orbax-checkpoint but no package
# index, in phases of a few minutes each (one device call per phase), the most wanted numbers first; every
# results file is rewritten as each suite ends, so a phase stopped by its time limit keeps what finished.
#
#   bash benchmarks/wheelhouse.sh wheels 3.12              # here, with an index
#   bash benchmarks/accelerator_run.sh 1 wheels OUT_DIR    # there: attention check; sd21 train (ours and the
#                                                          # peer), startup (warm cache), compiler options
#   bash benchmarks/accelerator_run.sh 2 wheels OUT_DIR    # sd21 profile + sampler
#   bash benchmarks/accelerator_run.sh 3 wheels OUT_DIR    # small,medium train; sd21 memory per remat policy
#
# All phases share one persistent compilation cache (CACHE, default /tmp/diffusion_jax_benchmark_cache):
# phase 1 starts it empty, so its compile times are cold, and a later phase on the same (still warm)
# machine loads the programs phase 1 compiled. On an H200 (2026-12-04) creating the sd21 state on the
# device took 249 s and compiling the step 146 s; each phase runs under PHASE_S seconds (default 540)
# and prints its table from the results written so far if that ends it. Phase 1 benchmarks with
# attention=auto only if the attention check passes, else with xla (and says so; give later phases
# ATTENTION=xla then). BIG and SMALL override the presets and CHECK_ARGS adds flags to the attention
# check, e.g. for a dry run on a CPU: BIG=tiny SMALL=tiny CHECK_ARGS="--batch=2 --tokens=256".
set -uo pipefail
phase="${1:?usage: accelerator_run.sh PHASE(1|2|3) WHEELS_DIR OUT_DIR}"
wheels="${2:?wheels dir}"
out="${3:?output dir}"
big="${BIG:-sd21}"
small="${SMALL:-small,medium}"
attention="${ATTENTION:-auto}"
cache="${CACHE:-/tmp/diffusion_jax_benchmark_cache}"
phase_s="${PHASE_S:-540}"
mkdir -p "$out"
exec > >(tee -a "$out/log_phase$phase") 2>&1
export USE_TORCH=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links "$wheels" ml_collections diffusers==0.35.2 || exit 1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
deadline=$(( $(date +%s) + phase_s ))

bench() {  # bench RESULTS_FILE ARGS...: benchmarks.run until the phase's deadline; the table even if cut off.
  local results="$1"; shift
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -le 0 ]; then echo "no time left in the phase for $results"; return 124; fi
  timeout --kill-after=10 "$left" python3 -m benchmarks.run --out="$results" "$@"
  local rc=$?
  if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ -f "$results" ]; then
    echo "stopped at the phase's deadline; the results so far:"
    python3 -c "import json, sys; from benchmarks import run; print(run.format_table(json.load(open(sys.argv[1]))))" \
      "$results"
  fi
  return "$rc"
}

case "$phase" in
  1)
    rm -rf "$cache"
    # shellcheck disable=SC2086  (CHECK_ARGS: several flags)
    if ! timeout 120 python3 -m benchmarks.attention_check ${CHECK_ARGS:-} --out="$out/attention.json"; then
      attention=xla
      echo "attention check failed: benchmarking with attention=xla"
    fi
    bench "$out/${big}_train.json" --config="$big" --suite=train,startup,compiler_options --attention="$attention" \
      --compilation_cache_dir="$cache" ;;
  2)
    bench "$out/${big}_profile_sampler.json" --config="$big" --suite=profile,sampler --attention="$attention" \
      --compilation_cache_dir="$cache" --trace_dir=/tmp/benchmark_traces ;;
  3)
    bench "$out/small_medium_train.json" --config="$small" --suite=train
    bench "$out/${big}_memory.json" --config="$big" --suite=memory --attention="$attention" \
      --compilation_cache_dir="$cache" ;;
  *) echo "unknown phase $phase (1, 2 or 3)"; exit 2 ;;
esac
