"""Prompts → images with a compiled-once sampler (library side of `python -m diffusion_jax.sample`)."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion.schedules import NoiseSchedule
from diffusion_jax.errors import UserError
from diffusion_jax.models.tokenizer import ByteTokenizer
from diffusion_jax.models.unet import TextToImageModel

def sampler_options(config, **overrides) -> samplers.SamplerOptions:
  """SamplerOptions from config.sampling and config.diffusion; keyword arguments override."""
  sc = config.sampling
  options = dict(sampler=sc.sampler, num_steps=sc.num_steps, spacing=sc.spacing, eta=sc.eta,
                 ddpm_variance=sc.ddpm_variance, prediction_type=config.diffusion.prediction_type,
                 x0_clipping=sc.x0_clipping, dynamic_threshold_percentile=sc.dynamic_threshold_percentile,
                 guidance_rescale=sc.guidance_rescale, guidance_interval=tuple(sc.guidance_interval))
  options.update({k: v for k, v in overrides.items() if v is not None})
  return samplers.SamplerOptions(**options)


def make_sample_fn(model: TextToImageModel, schedule: NoiseSchedule, options: samplers.SamplerOptions):
  """A jitted fn(params, tokens [N, L], uncond_tokens [N, L], guidance_scale [N], rng) → images
  [N, H, W, C] float32 in [-1, 1]. Compiles once per N (the scales are data, so a sweep does not
  recompile)."""
  options.validate(schedule.num_timesteps)

  def sample(params, tokens, uncond_tokens, guidance_scale, rng):
    encode = functools.partial(model.apply, {"params": params}, method=TextToImageModel.encode_text)
    denoise = lambda x, t, cond: model.apply({"params": params}, x, t, *cond,
                                             method=TextToImageModel.denoise)
    noise_rng, sampler_rng = jax.random.split(rng)
    x_T = jax.random.normal(noise_rng, (tokens.shape[0],) + tuple(model.image_shape))
    return samplers.sample(denoise, schedule, x_T, encode(tokens), encode(uncond_tokens), guidance_scale,
                           sampler_rng, options)

  return jax.jit(sample)


def tokenize_prompts(tokenizer: ByteTokenizer, prompts: Sequence[str], negative_prompt: str = ""
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [N, L], uncond tokens [N, L]); the unconditional prompt is `negative_prompt` ('' by default)."""
  tokens = tokenizer.encode_batch(list(prompts))
  uncond = np.repeat(tokenizer.encode(negative_prompt)[None], len(prompts), axis=0)
  return tokens, uncond


def generate(sample_fn, params: Any, tokenizer: ByteTokenizer, prompts: Sequence[str],
             guidance_scale: float | Sequence[float], seed: int, negative_prompt: str = "") -> np.ndarray:
  """Images [len(prompts), H, W, C] float32 in [-1, 1] for each prompt, from `seed`.

  The unconditional branch of guidance uses `negative_prompt` (the empty prompt by default)."""
  tokens, uncond = tokenize_prompts(tokenizer, prompts, negative_prompt)
  scales = np.broadcast_to(np.asarray(guidance_scale, np.float32), (len(prompts),))
  if not np.all(np.isfinite(scales)):
    raise UserError(f"guidance_scale must be a finite number, got {sorted(set(scales.tolist()), key=str)}")
  images = sample_fn(params, jnp.asarray(tokens), jnp.asarray(uncond), jnp.asarray(scales),
                     jax.random.PRNGKey(seed))
  if jax.process_count() > 1:  # The result may live on other hosts' devices too.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(images, tiled=True))
  return np.asarray(jax.device_get(images))


def parse_prompts(text: str) -> list[str]:
  """';'-separated prompts; empty entries are dropped."""
  return [p.strip() for p in text.split(";") if p.strip()]
