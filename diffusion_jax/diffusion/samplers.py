"""Samplers as one `jax.lax.scan` over timesteps, with classifier-free guidance in every step.

The model is any `denoise_fn(x_t [B, …], t [B], cond) → output [B, …]` where `cond` is a pytree
whose leaves have a leading batch axis (for the text model: the encoded prompt). Each step calls it
once on the concatenation [x; x] with [cond; uncond], so the conditional and unconditional
predictions come from one batched forward pass.

Guidance (Ho & Salimans 2022) with scale s: ε̂ = ε_u + s·(ε_c − ε_u). s = 1 is the plain
conditional model, s = 0 the unconditional one; the paper's w is s − 1.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion.losses import _bcast, to_eps_and_x0
from diffusion_jax.diffusion.schedules import NoiseSchedule

DenoiseFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def linspace_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Decreasing int32 timesteps from T−1 to 0, evenly spaced (`num_steps` of them)."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, {num_timesteps}]")
  return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


def guided_prediction(denoise_fn: DenoiseFn, x: jax.Array, t: jax.Array, cond: Any, uncond: Any,
                      guidance_scale: jax.Array) -> jax.Array:
  """u + s·(c − u) from one forward pass on the doubled batch. guidance_scale: [B].

  Written as c + (s − 1)·(c − u), which is the same number but exactly c at s = 1 in floating point.
  """
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)
  out = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
  out_c, out_u = jnp.split(out, 2)
  return out_c + (_bcast(guidance_scale, x) - 1.0) * (out_c - out_u)


def ddim_sample(denoise_fn: DenoiseFn, schedule: NoiseSchedule, x_T: jax.Array, cond: Any,
                uncond: Any, guidance_scale: jax.Array, rng: jax.Array, *, num_steps: int,
                eta: float = 0.0, prediction_type: str = "eps", clip_x0: bool = True) -> jax.Array:
  """DDIM (Song et al. 2021, eq. 12) with η; η = 1 gives DDPM-like ancestral noise.

  x_T: [B, H, W, C] standard normal. guidance_scale: [B]. Returns x_0 estimates [B, H, W, C].
  `num_steps` is static: one compilation per (shapes, num_steps).
  """
  timesteps = linspace_timesteps(schedule.num_timesteps, num_steps)
  prev_timesteps = np.append(timesteps[1:], -1).astype(np.int32)  # −1: ᾱ_prev = 1 (the data).
  batch = x_T.shape[0]
  abar = schedule.alphas_cumprod

  def step(x, inputs):
    t, t_prev, key = inputs
    t_batch = jnp.full((batch,), t, jnp.int32)
    a_t = jnp.full((batch,), abar[t])
    a_prev = jnp.full((batch,), jnp.where(t_prev >= 0, abar[jnp.maximum(t_prev, 0)], 1.0))
    output = guided_prediction(denoise_fn, x, t_batch, cond, uncond, guidance_scale)
    eps, x0 = to_eps_and_x0(prediction_type, output, x, a_t)
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = (x - jnp.sqrt(_bcast(a_t, x)) * x0) / jnp.sqrt(1.0 - _bcast(a_t, x))
    a_t, a_prev = _bcast(a_t, x), _bcast(a_prev, x)
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    noise = jax.random.normal(key, x.shape, x.dtype)
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps + sigma * noise
    return x_prev, None

  keys = jax.random.split(rng, num_steps)
  x0, _ = jax.lax.scan(step, x_T, (jnp.asarray(timesteps), jnp.asarray(prev_timesteps), keys))
  return x0
