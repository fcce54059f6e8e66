"""What a sample-quality evaluation costs beyond its sampling, measured side by side.

  python benchmarks/sample_eval_cost.py [--config=configs/digits.py] [--num_samples=500] [--batch=250]

Times, for the same N samples, batch and sampler: (a) the sampler alone (the compiled-once `lax.scan`
sampler, images to the host), (b) `SampleEvaluator.evaluate` (sampling + uint8 + feature network in one
jitted call, features streamed into float64 statistics, Fréchet distance, KID, precision/recall, IS,
reference-classifier accuracy). Reports compile (first call) and steady-state times and the ratio b / a:
the periodic evaluation during training should cost about its sampling.
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
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import build, config as config_lib, generation
from diffusion_jax.metrics import sample_eval

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Model config.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 500, "Samples per evaluation.")
_BATCH = flags.DEFINE_integer("batch", 250, "Global sampling batch.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (the median is reported).")


def _timed(fn, repeats):
  first_start = time.perf_counter()
  fn()
  first = time.perf_counter() - first_start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def main(argv):
  del argv
  config = _CONFIG.value
  run = build.build(config)
  state, _ = run.create_state(jax.random.PRNGKey(0))
  params = jax.device_get(state.ema_params)
  options = generation.sampler_options(config)
  n, batch = _NUM_SAMPLES.value, sample_eval.round_batch(_BATCH.value, run.mesh)
  scale = config.sampling.guidance_scale
  (setting,) = sample_eval.settings_for(run.conditioning.kind, [scale])

  sample_fn = generation.make_sample_fn(run.model, run.schedule, options, run.autoencoder)
  labels = run.dataset.canonical_labels
  requests = {"text": [run.dataset.caption_for(labels[i % len(labels)]) for i in range(batch)],
              "class": [labels[i % len(labels)] for i in range(batch)]}.get(run.conditioning.kind, [None] * batch)
  inputs = jax.tree.map(jnp.asarray, run.conditioning.inputs_for(requests))
  null_inputs = jax.tree.map(jnp.asarray, run.conditioning.null_inputs(batch))
  scales = jnp.full((batch,), scale, jnp.float32)

  def sample_only():
    for b in range(-(-n // batch)):
      np.asarray(sample_fn(params, inputs, null_inputs, scales, jax.random.PRNGKey(b)))

  evaluator = sample_eval.create_evaluator(
      run, feature_network=config_lib.resolved_feature_network(config), inception_weights=config.eval.inception_weights,
      cache=config.eval.cache_dir, num_samples=n, batch_size=batch, options=options, seed=0)
  evaluate = lambda: evaluator.evaluate(params, [setting])

  sample_first, sample_time = _timed(sample_only, _REPEATS.value)
  eval_first, eval_time = _timed(evaluate, _REPEATS.value)
  print(json.dumps({
      "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(), "num_samples": n, "batch": batch,
      "sampler": options.sampler, "steps": options.num_steps,
      "sampling_only_s": round(sample_time, 3), "evaluate_s": round(eval_time, 3),
      "evaluate_over_sampling": round(eval_time / sample_time, 3),
      "first_call_s": {"sampling_only": round(sample_first, 2), "evaluate": round(eval_first, 2)},
  }, indent=1))


if __name__ == "__main__":
  app.run(main)
