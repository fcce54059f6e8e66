"""Train-step throughput, achieved FLOP/s against this machine's measured matmul peak, and peak memory
with and without remat, measured side by side in one run.

  python benchmarks/train_step.py [--config=configs/digits.py] [--steps=20]

FLOPs come from the compiled step's cost analysis; the peak is the best of a few large float32
matmuls timed in the same process. Peak memory is the compiled step's memory analysis (arguments +
outputs + temporaries − aliased donations), so it does not depend on timing noise.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ import each other.

import json
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks.run import matmul_peak_flops
from diffusion_jax import build, train_state
from diffusion_jax import train_step as train_step_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Model and batch config.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per variant.")


def measure(config, steps: int) -> dict:
  run = build.build(config)
  state, shardings = train_state.create_train_state(jax.random.PRNGKey(0), run.model, run.optimizer, run.mesh,
                                                    run.rules, config.mesh.replicate_indivisible)
  step = train_step_lib.make_train_step(run, shardings)
  b, s = config.batch_size, config.dataset.image_size
  rng = np.random.default_rng(0)
  # One request repeated: a caption (text models), a label (class models), nothing (unconditional).
  label = run.dataset.canonical_labels[0]
  request = {"text": run.dataset.caption_for(label), "class": label}.get(run.conditioning.kind)
  local = {"image": rng.integers(0, 256, (b, s, s, config.dataset.channels), dtype=np.uint8),
           **run.conditioning.inputs_for([request] * b)}
  batch = train_step_lib.global_batch(local, run.mesh, ("image",) + tuple(run.conditioning.input_keys))
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  mem = compiled.memory_analysis()
  state, m = compiled(state, batch)  # Warm-up.
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - start) / steps
  peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes) if mem is not None else None
  return {"compile_s": round(compile_s, 2), "step_ms": round(1e3 * step_s, 2),
          "images_per_s": round(b / step_s, 1), "gflop_per_step": round(cost["flops"] / 1e9, 3),
          "achieved_gflop_s": round(cost["flops"] / step_s / 1e9, 2),
          "temp_mib": round(mem.temp_size_in_bytes / 2**20, 2) if mem else None,
          "peak_mib": round(peak_bytes / 2**20, 2) if peak_bytes else None}


def main(argv):
  del argv
  config = _CONFIG.value
  peak = matmul_peak_flops("float32")
  results = {"device": str(jax.devices()[0]), "num_devices": jax.device_count(), "batch_size": config.batch_size,
             "matmul_peak_gflop_s": round(peak / 1e9, 1)}
  for policy in ("none", "full"):
    config.model.remat_policy = policy
    r = measure(config, _STEPS.value)
    r["fraction_of_matmul_peak"] = round(r["achieved_gflop_s"] * 1e9 / peak, 3)
    results[f"remat_{policy}"] = r
  results["temp_memory_ratio_full_over_none"] = round(
      results["remat_full"]["temp_mib"] / results["remat_none"]["temp_mib"], 3)
  results["step_time_ratio_full_over_none"] = round(
      results["remat_full"]["step_ms"] / results["remat_none"]["step_ms"], 3)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
