"""Scan sampler vs a Python loop of jitted steps, on the digits model, measured side by side.

Both run the same step function (`samplers.make_step_fn`): the scan compiles the whole trajectory
into one program; the loop compiles one step and dispatches it `steps` times from Python.

  python benchmarks/sampler_scan_vs_loop.py [--config=configs/digits.py] [--batch=80] [--steps=50]

Reports compile time and steady-state time per sampler step for each, and their ratios.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ import each other.

import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import build, generation
from diffusion_jax.diffusion import samplers
from diffusion_jax.models.diffusion_model import DiffusionModel

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Model config.")
_BATCH = flags.DEFINE_integer("batch", 80, "Images per call (each step runs the model on 2× this).")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampler steps.")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", list(samplers.SAMPLERS), "Sampler.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (the median is reported).")


def _time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  config = _CONFIG.value
  run = build.build(config)
  model, schedule = run.model, run.schedule
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), *model.dummy_inputs())["params"])()
  params = jax.tree.map(lambda p: p.value if hasattr(p, "value") else p, params,
                        is_leaf=lambda p: hasattr(p, "value"))
  options = generation.sampler_options(config, sampler=_SAMPLER.value, num_steps=_STEPS.value)
  # One request repeated: a caption (text models), a label (class models), nothing (unconditional).
  label = run.dataset.canonical_labels[0]
  request = {"text": run.dataset.caption_for(label), "class": label}.get(run.conditioning.kind)
  inputs = jax.tree.map(jnp.asarray, run.conditioning.inputs_for([request] * _BATCH.value))
  null_inputs = jax.tree.map(jnp.asarray, run.conditioning.null_inputs(_BATCH.value))
  scale = jnp.full((_BATCH.value,), 3.0)
  rng = jax.random.PRNGKey(0)

  # Scan: the library's compiled-once sampler.
  scan_fn = generation.make_sample_fn(model, schedule, options, run.autoencoder)
  start = time.perf_counter()
  scan_compiled = scan_fn.lower(params, inputs, null_inputs, scale, rng).compile()
  scan_compile = time.perf_counter() - start
  scan_time = _time(lambda: scan_compiled(params, inputs, null_inputs, scale, rng), _REPEATS.value)

  # Loop: the same step, jitted alone, called once per timestep from Python.
  def one_step(params, cond, uncond, scale, carry, inputs):
    denoise = lambda x, t, c: model.apply({"params": params}, x, t, c, method=DiffusionModel.denoise)
    return samplers.make_step_fn(denoise, cond, uncond, scale, options, schedule.num_timesteps)(carry, inputs)[0]

  encode = jax.jit(lambda p, i: model.apply({"params": p}, i, method=DiffusionModel.encode_condition))
  cond = encode(params, inputs)
  # As the scan sampler: an unconditional model has no unconditional branch (one forward pass per step).
  uncond = encode(params, null_inputs) if model.conditioning_kind != "none" else None
  consts, keys = samplers.step_inputs(schedule, options, rng)
  per_step = [(jax.tree.map(lambda a, i=i: a[i], consts), keys[i]) for i in range(_STEPS.value)]
  x_T = jax.random.normal(rng, (_BATCH.value,) + tuple(model.latent_shape))
  carry0 = (x_T, jnp.zeros_like(x_T))
  start = time.perf_counter()
  step_compiled = jax.jit(one_step).lower(params, cond, uncond, scale, carry0, per_step[0]).compile()
  loop_compile = time.perf_counter() - start

  def run_loop():
    carry = carry0
    for xs in per_step:
      carry = step_compiled(params, cond, uncond, scale, carry, xs)
    return run.autoencoder.decode(params, carry[0])  # As the scan sampler's output.

  loop_time = _time(run_loop, _REPEATS.value)
  result = {
      "device": str(jax.devices()[0]), "sampler": _SAMPLER.value, "batch": _BATCH.value, "steps": _STEPS.value,
      "scan_compile_s": round(scan_compile, 3), "loop_compile_s": round(loop_compile, 3),
      "scan_ms_per_step": round(1e3 * scan_time / _STEPS.value, 3),
      "loop_ms_per_step": round(1e3 * loop_time / _STEPS.value, 3),
      "compile_ratio_scan_over_loop": round(scan_compile / loop_compile, 3),
      "step_time_ratio_loop_over_scan": round(loop_time / scan_time, 3),
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
