#!/usr/bin/env bash
# The benchmarks on a lent accelerator host that has jax, flax, optax and orbax-checkpoint but no package
# index, in phases of a few minutes each (one device call per phase), the most wanted numbers first; every
# results file is rewritten as each suite ends, so a phase stopped by its time limit keeps what finished.
#
#   bash benchmarks/wheelhouse.sh wheels 3.12              # here, with an index
#   bash benchmarks/accelerator_run.sh 1 wheels OUT_DIR    # there: attention check; sd21 train + profile
#   bash benchmarks/accelerator_run.sh 2 wheels OUT_DIR    # sd21 startup (fresh processes) + sampler
#   bash benchmarks/accelerator_run.sh 3 wheels OUT_DIR    # small,medium train; sd21 memory per remat policy
#
# On an H200 (2026-12-04) phase 1 took over 9 minutes with the state created on the device (249 s) and
# the attention check failing; budget ~7 minutes per phase now. Phase 1 benchmarks with attention=auto
# only if the attention check passes, else with xla (and says so; give later phases ATTENTION=xla then).
# BIG and SMALL override the presets and CHECK_ARGS adds flags to the attention check, e.g. for a dry run
# on a CPU: BIG=tiny SMALL=tiny CHECK_ARGS="--batch=2 --tokens=256".
set -uo pipefail
phase="${1:?usage: accelerator_run.sh PHASE(1|2|3) WHEELS_DIR OUT_DIR}"
wheels="${2:?wheels dir}"
out="${3:?output dir}"
big="${BIG:-sd21}"
small="${SMALL:-small,medium}"
attention="${ATTENTION:-auto}"
mkdir -p "$out"
exec > >(tee -a "$out/log_phase$phase") 2>&1
export USE_TORCH=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links "$wheels" ml_collections diffusers==0.35.2 || exit 1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

case "$phase" in
  1)
    # shellcheck disable=SC2086  (CHECK_ARGS: several flags)
    if ! python3 -m benchmarks.attention_check ${CHECK_ARGS:-} --out="$out/attention.json"; then
      attention=xla
      echo "attention check failed: benchmarking with attention=xla"
    fi
    python3 -m benchmarks.run --config="$big" --suite=train,profile --attention="$attention" \
      --out="$out/${big}_train.json" --trace_dir=/tmp/benchmark_traces ;;
  2)
    python3 -m benchmarks.run --config="$big" --suite=startup,sampler --attention="$attention" \
      --out="$out/${big}_startup_sampler.json" ;;
  3)
    python3 -m benchmarks.run --config="$small" --suite=train --out="$out/small_medium_train.json"
    python3 -m benchmarks.run --config="$big" --suite=memory --attention="$attention" \
      --out="$out/${big}_memory.json" ;;
  *) echo "unknown phase $phase (1, 2 or 3)"; exit 2 ;;
esac
