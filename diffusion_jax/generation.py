"""Requests (prompts, labels or nothing) → images with a compiled-once sampler.

The library side of `python -m diffusion_jax.sample`, also used by training's sample grids and by
evaluation. The conditioning kind decides what a request is: a prompt for text models, a label for
class models, nothing for unconditional models (which sample without guidance).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import compiler
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion.schedules import NoiseSchedule
from diffusion_jax.errors import UserError
from diffusion_jax.models.diffusion_model import DiffusionModel


def sampler_options(config, **overrides) -> samplers.SamplerOptions:
  """SamplerOptions from config.sampling and config.diffusion; keyword arguments override."""
  sc = config.sampling
  options = dict(sampler=sc.sampler, num_steps=sc.num_steps, spacing=sc.spacing, eta=sc.eta,
                 ddpm_variance=sc.ddpm_variance, prediction_type=config.diffusion.prediction_type,
                 x0_clipping=sc.x0_clipping, dynamic_threshold_percentile=sc.dynamic_threshold_percentile,
                 guidance_rescale=sc.guidance_rescale, guidance_interval=tuple(sc.guidance_interval))
  options.update({k: v for k, v in overrides.items() if v is not None})
  return samplers.SamplerOptions(**options)


def make_sample(model: DiffusionModel, schedule: NoiseSchedule, options: samplers.SamplerOptions, autoencoder,
                *, guide: bool = True):
  """fn(params, inputs, null_inputs, guidance_scale [N], rng) → images [N, H, W, C] float32 in [-1, 1],
  decoded by `autoencoder`, not yet jitted (evaluation jits it together with a feature network).
  `inputs`/`null_inputs` are the conditioning inputs of the requests and of the unconditional branch
  ({} for unconditional models).

  guide=False samples from the conditional prediction alone, which is what guidance scale 1 gives
  (c + (1 − 1)·(c − u) = c exactly), with half the work of the doubled batch; `null_inputs` and
  `guidance_scale` are then unused.
  """
  options.validate(schedule.num_timesteps)
  guided = guide and model.conditioning_kind != "none"

  def sample(params, inputs, null_inputs, guidance_scale, rng):
    encode = lambda x: model.apply({"params": params}, x, method=DiffusionModel.encode_condition)
    denoise = lambda x, t, cond: model.apply({"params": params}, x, t, cond, method=DiffusionModel.denoise)
    noise_rng, sampler_rng = jax.random.split(rng)
    x_T = jax.random.normal(noise_rng, (guidance_scale.shape[0],) + tuple(model.latent_shape))
    uncond = encode(null_inputs) if guided else None
    x0 = samplers.sample(denoise, schedule, x_T, encode(inputs), uncond, guidance_scale, sampler_rng, options)
    return autoencoder.decode(params, x0)

  return sample


def make_sample_fn(model: DiffusionModel, schedule: NoiseSchedule, options: samplers.SamplerOptions,
                   autoencoder):
  """`make_sample` jitted: compiles once per N (the scales are data, so a sweep does not recompile)."""
  return compiler.jit(make_sample(model, schedule, options, autoencoder))


def generate(sample_fn, params: Any, conditioning, requests: Sequence[Any],
             guidance_scale: float | Sequence[float], seed: int, negative_prompt: str = "") -> np.ndarray:
  """Images [len(requests), H, W, C] float32 in [-1, 1], one per request, from `seed`.

  requests: prompts (text models), labels (class models) or placeholders (unconditional: only their
  number counts). The unconditional branch of guidance uses `negative_prompt` (text models) or the
  null label."""
  images = sample_fn(params, *_sample_args(conditioning, requests, guidance_scale, seed, negative_prompt))
  if jax.process_count() > 1:  # The result may live on other hosts' devices too.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(images, tiled=True))
  return np.asarray(jax.device_get(images))


def compile_generate(sample_fn, abstract_params: Any, conditioning, requests: Sequence[Any],
                     negative_prompt: str = "") -> None:
  """Compiles `sample_fn` for `generate(sample_fn, params, conditioning, requests, …)` with parameters of
  `abstract_params`' shapes and shardings, ahead of that call (which then reuses the program): for a
  caller that has idle time now, such as training's start-up while the train step compiles."""
  sample_fn.lower(abstract_params, *_sample_args(conditioning, requests, 1.0, 0, negative_prompt)).compile()


def _sample_args(conditioning, requests: Sequence[Any], guidance_scale: float | Sequence[float], seed: int,
                 negative_prompt: str) -> tuple:
  """sample_fn's arguments after the parameters: (inputs, null inputs, scales [N], key)."""
  n = len(requests)
  scales = np.broadcast_to(np.asarray(guidance_scale, np.float32), (n,))
  if not np.all(np.isfinite(scales)):
    raise UserError(f"guidance_scale must be a finite number, got {sorted(set(scales.tolist()), key=str)}")
  inputs = jax.tree.map(jnp.asarray, conditioning.inputs_for(requests))
  null = jax.tree.map(jnp.asarray, conditioning.null_inputs(n, negative_prompt))
  return inputs, null, jnp.asarray(scales), jax.random.PRNGKey(seed)


def parse_prompts(text: str) -> list[str]:
  """';'-separated prompts; empty entries are dropped."""
  return [p.strip() for p in text.split(";") if p.strip()]


def parse_labels(text: str) -> list[int]:
  """','-separated integer labels, e.g. '3,7,7'."""
  try:
    return [int(p) for p in text.split(",") if p.strip()]
  except ValueError as exc:
    raise UserError(f"labels {text!r}: give integers separated by ',' (e.g. 3,7,7)") from exc


def grid_requests(config, dataset, conditioning_kind: str) -> list[Any]:
  """One request per grid row: the config's prompts or labels, else the dataset's canonical ones
  (for unconditional models, as many rows as the dataset has canonical labels)."""
  labels = list(dataset.canonical_labels)
  if conditioning_kind == "text":
    return parse_prompts(config.sampling.prompts) or [dataset.caption_for(l) for l in labels]
  if conditioning_kind == "class":
    return parse_labels(config.sampling.labels) or labels
  return [None] * len(labels)
