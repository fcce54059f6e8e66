"""FLOPs of one training step of a config, from the compiled step, and what a run costs on an accelerator.

  python benchmarks/step_flops.py --config=configs/ddpm_cifar10.py [--peak_tflops=989 --utilization=0.4]

The step is lowered on abstract arrays (`jax.eval_shape`: nothing is allocated, so a paper-sized model
compiles on a laptop) and XLA's cost analysis counts its FLOPs: forward, backward, optimizer and EMA at
the config's global batch. Accelerator-hours = FLOPs/step × config.num_train_steps / (peak × utilization);
the defaults are one H100 SXM's dense bf16 peak (989 TFLOP/s) and 40% utilization — pass your chip's
(TPU v4: 275, v5e: 197, A100: 312) and the utilization `benchmarks/train_step.py` measures there.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ import each other.

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from benchmarks import presets
from diffusion_jax import build
from diffusion_jax import train_step as train_step_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ddpm_cifar10.py", "Experiment config.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "The accelerator's peak (dense, compute dtype) in TFLOP/s.")
_UTILIZATION = flags.DEFINE_float("utilization", 0.4, "Achieved fraction of the peak.")


def step_flops(config) -> tuple[float, float]:
  """(FLOPs of one compiled training step at config.batch_size, compile seconds)."""
  if not config.dataset.name:
    config.dataset.name = presets.stand_in_dataset(
        (config.dataset.image_size, config.dataset.image_size, config.dataset.channels))
  run = build.build(config, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  abstract = run.abstract_state()
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  step = train_step_lib.make_train_step(run, shardings)
  b, s, c = config.batch_size, config.dataset.image_size, config.dataset.channels
  batch = {"image": jax.ShapeDtypeStruct((b, s, s, c), jnp.uint8)}
  dummy = run.conditioning.inputs_for([None if run.conditioning.kind == "none" else
                                       (0 if run.conditioning.kind == "class" else "")] * b)
  batch.update({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in dummy.items()})
  start = time.perf_counter()
  compiled = step.lower(abstract, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"]), time.perf_counter() - start


def main(argv):
  del argv
  config = _CONFIG.value
  flops, compile_s = step_flops(config)
  total = flops * config.num_train_steps
  hours = total / (_PEAK.value * 1e12 * _UTILIZATION.value) / 3600
  print(json.dumps({
      "batch_size": config.batch_size, "num_train_steps": config.num_train_steps,
      "tflop_per_step": round(flops / 1e12, 3), "tflop_per_image": round(flops / config.batch_size / 1e12, 5),
      "total_exaflop": round(total / 1e18, 2), "peak_tflops": _PEAK.value, "utilization": _UTILIZATION.value,
      "accelerator_hours": round(hours, 1), "compile_s": round(compile_s, 1),
  }, indent=1))


if __name__ == "__main__":
  app.run(main)
