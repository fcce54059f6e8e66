#!/usr/bin/env bash
# Runs N local CPU processes that form one jax.distributed job (gloo collectives), each with
# DEVICES_PER_PROCESS simulated devices. Usage:
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=1 launch/local_multiprocess.sh --config=configs/digits.py --workdir=runs/mp
# DRY_RUN=1 prints the commands instead of running them; PYTHON picks the interpreter (default python3).
set -euo pipefail
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  cmd=(env DIFFUSION_JAX_COORDINATOR="127.0.0.1:${PORT}" DIFFUSION_JAX_NUM_PROCESSES="${NUM_PROCESSES}"
       DIFFUSION_JAX_PROCESS_ID="${i}" JAX_PLATFORMS=cpu
       XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
       "${PYTHON:-python3}" -m diffusion_jax.main "$@")
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"; echo
  else
    "${cmd[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
