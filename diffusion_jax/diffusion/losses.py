"""Forward process q(x_t | x_0), model parameterizations (ε, v, x0) and the training loss."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion.schedules import NoiseSchedule

PREDICTION_TYPES = ("eps", "v", "x0")


def _bcast(a: jax.Array, like: jax.Array) -> jax.Array:
  """[B] → [B, 1, …, 1] to broadcast against `like`."""
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def q_sample(x0: jax.Array, alpha_bar: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε  (DDPM eq. 4). alpha_bar: [B]; x0, noise: [B, …]."""
  a = _bcast(alpha_bar, x0)
  return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def prediction_target(prediction_type: str, x0: jax.Array, noise: jax.Array,
                      alpha_bar: jax.Array) -> jax.Array:
  """What the network is trained to output. v = √ᾱ·ε − √(1−ᾱ)·x_0 (Salimans & Ho 2022)."""
  if prediction_type == "eps":
    return noise
  if prediction_type == "x0":
    return x0
  if prediction_type == "v":
    a = _bcast(alpha_bar, x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0
  raise ValueError(f"prediction_type={prediction_type!r}; choose one of {PREDICTION_TYPES}")


def to_eps_and_x0(prediction_type: str, output: jax.Array, x_t: jax.Array,
                  alpha_bar: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Converts a network output to (ε̂, x̂_0) given x_t and ᾱ_t ([B])."""
  a = _bcast(alpha_bar, x_t)
  sa, s1a = jnp.sqrt(a), jnp.sqrt(1.0 - a)
  if prediction_type == "eps":
    return output, (x_t - s1a * output) / sa
  if prediction_type == "x0":
    return (x_t - sa * output) / s1a, output
  if prediction_type == "v":
    return sa * output + s1a * x_t, sa * x_t - s1a * output
  raise ValueError(f"prediction_type={prediction_type!r}; choose one of {PREDICTION_TYPES}")


LOSS_WEIGHTINGS = ("uniform", "min_snr")


def loss_weight(weighting: str, prediction_type: str, alpha_bar: jax.Array, gamma: float = 5.0) -> jax.Array:
  """Per-example weight [B] on ||target − output||².

  uniform: 1 (DDPM's simple loss in the chosen parameterization).
  min_snr (Hang et al. 2023): the x0-space weight min(SNR, γ), expressed in each parameterization:
  ||ε-error||² = SNR·||x0-error||² and ||v-error||² = (SNR + 1)·||x0-error||², so the weights are
  min(SNR, γ)/SNR (ε), min(SNR, γ)/(SNR + 1) (v) and min(SNR, γ) (x0): the same objective in all three.
  """
  if weighting == "uniform":
    return jnp.ones_like(alpha_bar)
  if weighting != "min_snr":
    raise ValueError(f"loss weighting {weighting!r}; choose one of {LOSS_WEIGHTINGS}")
  snr = alpha_bar / (1.0 - alpha_bar)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "eps":
    return clipped / snr
  if prediction_type == "v":
    return clipped / (snr + 1.0)
  if prediction_type == "x0":
    return clipped
  raise ValueError(f"prediction_type={prediction_type!r}; choose one of {PREDICTION_TYPES}")


def draw_timesteps_and_noise(rng: jax.Array, x0: jax.Array, num_timesteps: int) -> tuple[jax.Array, jax.Array]:
  """One uniform t ∈ [0, T) [B] int32 and one ε ~ N(0, I) [B, …] per example."""
  t_rng, noise_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, num_timesteps)
  return t, jax.random.normal(noise_rng, x0.shape, x0.dtype)


def per_example_loss(predict_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array, t: jax.Array,
                     noise: jax.Array, schedule: NoiseSchedule, prediction_type: str, *,
                     weighting: str = "uniform", min_snr_gamma: float = 5.0) -> jax.Array:
  """w_t·||target − f(x_t, t)||² averaged over pixels: [B]. x0, noise: [B, H, W, C]; t: [B]."""
  alpha_bar = schedule.alphas_cumprod[t]
  x_t = q_sample(x0, alpha_bar, noise)
  target = prediction_target(prediction_type, x0, noise, alpha_bar)
  mse = jnp.mean((predict_fn(x_t, t).astype(jnp.float32) - target) ** 2, axis=tuple(range(1, x0.ndim)))
  return loss_weight(weighting, prediction_type, alpha_bar, min_snr_gamma) * mse


def diffusion_loss(predict_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array,
                   schedule: NoiseSchedule, prediction_type: str, rng: jax.Array, *,
                   weighting: str = "uniform", min_snr_gamma: float = 5.0) -> jax.Array:
  """Monte-Carlo estimate of E_{t, ε} w_t·||target − f(x_t, t)||², one (t, ε) per example.

  predict_fn(x_t [B, H, W, C], t [B] int32) → [B, H, W, C]. x0: [B, H, W, C] in [-1, 1].
  Returns the scalar mean over batch and pixels.
  """
  t, noise = draw_timesteps_and_noise(rng, x0, schedule.num_timesteps)
  return jnp.mean(per_example_loss(predict_fn, x0, t, noise, schedule, prediction_type,
                                   weighting=weighting, min_snr_gamma=min_snr_gamma))
