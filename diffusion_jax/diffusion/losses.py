"""Forward process q(x_t | x_0), model parameterizations (ε, v, x0) and the training loss.

A model that learns its reverse-process variance (improved DDPM, Nichol & Dhariwal 2021, §3.1) outputs
2·C channels: the C channels of the prediction (ε, v or x0), then C raw values v that interpolate the
log-variance between log β̃_t and log β_t (`vlb.learned_log_variance`, eq. 15). It is trained with
L_hybrid = L_simple + λ·L_vlb (eq. 16), the variance learning only from L_vlb (`hybrid_loss_terms`).
"""

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


def _at_least_float32(x: jax.Array) -> jax.Array:
  """A bfloat16 network output in float32, for the loss; float32 and float64 as they are."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def split_output(output: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """(prediction, variance values v or None) of a network output on x [B, …, C].

  output [B, …, C]: a fixed-variance model; (output, None).
  output [B, …, 2·C]: a learned-variance model (improved DDPM); (output[…, :C], output[…, C:]).
  The channel count is static, so under jit this is decided at trace time.
  """
  channels = x.shape[-1]
  if output.shape[-1] == channels:
    return output, None
  if output.shape[-1] == 2 * channels:
    return output[..., :channels], output[..., channels:]
  raise ValueError(f"model output has {output.shape[-1]} channels; expected {channels} (the prediction) or "
                   f"{2 * channels} (prediction and learned variance) for inputs of {channels} channels")


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


def hybrid_loss_terms(output: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array, noise: jax.Array,
                      schedule: NoiseSchedule, prediction_type: str, *, weighting: str = "uniform",
                      min_snr_gamma: float = 5.0) -> tuple[jax.Array, jax.Array]:
  """The two parts of improved DDPM's L_hybrid = L_simple + λ·L_vlb (Nichol & Dhariwal 2021, eq. 16): [B] each.

  output: the learned-variance network's 2·C channels on (x_t, t); x0, x_t, noise: [B, …, C] (x0 uint8
  data scaled to [-1, 1]); t: [B] int32.
  L_simple = w_t·||target − prediction||² averaged over pixels (the weighting of `loss_weight`).
  L_vlb = T·L_t in bits/dim, the single-t Monte-Carlo estimate of Σ_t L_t (eq. 4–6): L_t =
  KL(q(x_{t−1} | x_t, x_0) ‖ p(x_{t−1} | x_t)) for t ≥ 1 and the discretized decoder's −log p(x_0 | x_1)
  at t = 0 (`vlb.vlb_terms` with model_variance='learned'). The prediction enters L_vlb through a stop-
  gradient (§3.1: "we apply a stop-gradient to the μ_θ(x_t, t) output for the L_vlb term"), so the mean
  learns only from L_simple and the variance only from L_vlb.
  """
  from diffusion_jax.diffusion import vlb  # pylint: disable=g-import-not-at-top  (vlb imports this module)
  prediction, var_values = split_output(_at_least_float32(output), x0)
  if var_values is None:
    raise ValueError(f"the hybrid loss needs a learned-variance output of {2 * x0.shape[-1]} channels "
                     f"(prediction and variance); got {output.shape[-1]}")
  alpha_bar = schedule.alphas_cumprod[t]
  target = prediction_target(prediction_type, x0, noise, alpha_bar)
  mse = jnp.mean((prediction - target) ** 2, axis=tuple(range(1, x0.ndim)))
  l_simple = loss_weight(weighting, prediction_type, alpha_bar, min_snr_gamma) * mse
  frozen = jnp.concatenate([jax.lax.stop_gradient(prediction), var_values], axis=-1)
  l_t = vlb.vlb_terms(frozen, x0, x_t, t, schedule, prediction_type, "learned", clip_x0=False)
  return l_simple, schedule.num_timesteps * l_t


def per_example_loss(predict_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array, t: jax.Array,
                     noise: jax.Array, schedule: NoiseSchedule, prediction_type: str, *,
                     weighting: str = "uniform", min_snr_gamma: float = 5.0, learn_sigma: bool = False,
                     vlb_weight: float = 0.001) -> jax.Array:
  """The training loss per example: [B]. x0, noise: [B, H, W, C]; t: [B].

  learn_sigma=False: w_t·||target − f(x_t, t)||² averaged over pixels (DDPM's L_simple, weighted).
  learn_sigma=True: f outputs 2·C channels and the loss is L_hybrid = L_simple + λ·L_vlb with
  λ = `vlb_weight` (improved DDPM eq. 16, λ = 0.001; see `hybrid_loss_terms`).
  """
  alpha_bar = schedule.alphas_cumprod[t]
  x_t = q_sample(x0, alpha_bar, noise)
  if learn_sigma:
    l_simple, l_vlb = hybrid_loss_terms(predict_fn(x_t, t), x0, x_t, t, noise, schedule, prediction_type,
                                        weighting=weighting, min_snr_gamma=min_snr_gamma)
    return l_simple + vlb_weight * l_vlb
  target = prediction_target(prediction_type, x0, noise, alpha_bar)
  mse = jnp.mean((_at_least_float32(predict_fn(x_t, t)) - target) ** 2, axis=tuple(range(1, x0.ndim)))
  return loss_weight(weighting, prediction_type, alpha_bar, min_snr_gamma) * mse


def diffusion_loss(predict_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array,
                   schedule: NoiseSchedule, prediction_type: str, rng: jax.Array, *,
                   weighting: str = "uniform", min_snr_gamma: float = 5.0, learn_sigma: bool = False,
                   vlb_weight: float = 0.001) -> jax.Array:
  """Monte-Carlo estimate of the training loss (`per_example_loss`), one (t, ε) per example.

  predict_fn(x_t [B, H, W, C], t [B] int32) → [B, H, W, C] (or [B, H, W, 2·C] with learn_sigma).
  x0: [B, H, W, C] in [-1, 1]. Returns the scalar mean over batch and pixels.
  """
  t, noise = draw_timesteps_and_noise(rng, x0, schedule.num_timesteps)
  return jnp.mean(per_example_loss(predict_fn, x0, t, noise, schedule, prediction_type,
                                   weighting=weighting, min_snr_gamma=min_snr_gamma, learn_sigma=learn_sigma,
                                   vlb_weight=vlb_weight))
