"""The variational bound on −log p(x_0) in bits per dimension, for fixed or learned reverse variances.

DDPM (Ho et al. 2020, eq. 5): L = L_T + Σ_{t>1} L_{t−1} + L_0 with
  L_T     = KL(q(x_T | x_0) ‖ N(0, I)),
  L_{t−1} = KL(q(x_{t−1} | x_t, x_0) ‖ p(x_{t−1} | x_t)),
  L_0     = −log p(x_0 | x_1), a discretized Gaussian decoder (eq. 13).

Timesteps here are 0-based as everywhere in this package: index t has ᾱ_t = alphas_cumprod[t], so the
paper's step t is index t − 1, and index 0's "previous" state is the data (ᾱ_{−1} = 1). Term index 0
is the decoder L_0; term index t ≥ 1 is the paper's L_t, a KL. Everything is in nats internally; the
public bounds are in bits per dimension (nats averaged over all non-batch dims, divided by ln 2),
for data that was uint8 and is scaled to [-1, 1] (256 bins of width 2/255).

The reverse variance σ_t² is fixed (β̃_t or β_t, DDPM §3.2) or learned (improved DDPM eq. 15: the
network's extra C output channels interpolate log σ_t² between log β̃_t and log β_t).

The bookkeeping follows improved DDPM (Nichol & Dhariwal 2021) and its reference code
(improved-diffusion: `normal_kl`, `discretized_gaussian_log_likelihood`, `_vb_terms_bpd`,
`calc_bpd_loop`), with exact normal CDFs instead of its tanh approximation.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from diffusion_jax.diffusion.losses import _bcast, q_sample, split_output, to_eps_and_x0
from diffusion_jax.diffusion.schedules import NoiseSchedule

MODEL_VARIANCES = ("fixed_small", "fixed_large", "learned")
_LN2 = float(np.log(2.0))
_BIN_HALF_WIDTH = 1.0 / 255.0  # [-1, 1] cut into 256 bins of width 2/255, centred on the uint8 values.


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all non-batch dims: [B, …] → [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
  """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats, elementwise (arguments broadcast).

  = ½·(expm1(d) − d + (mean1 − mean2)²·e^(−logvar2)), d = logvar1 − logvar2.

  expm1(d) − d, not e^d − 1 − d: near d = 0 (a learned variance close to the true one) the KL is ~d²/4,
  and e^d − 1 in float32 loses it to an absolute rounding error of ~6e-8 (at d = 0.01, 0.2% of the KL).
  """
  d = logvar1 - logvar2
  return 0.5 * (jnp.expm1(d) - d + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log_normal_mass(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """log(Φ(hi) − Φ(lo)) for finite standardized bounds lo < hi, accurate far out in the tails.

  An interval above the mean is mirrored below it (Φ(hi) − Φ(lo) = Φ(−lo) − Φ(−hi)), so both CDFs are
  at most ~½ and log_ndtr keeps full relative precision; then
  log(Φ(hi) − Φ(lo)) = log Φ(hi) + log(1 − e^(log Φ(lo) − log Φ(hi))).
  """
  flip = lo + hi > 0
  lo, hi = jnp.where(flip, -hi, lo), jnp.where(flip, -lo, hi)
  log_hi = log_ndtr(hi)
  one_minus_ratio = -jnp.expm1(log_ndtr(lo) - log_hi)
  # The clamp only bites when the interval is so narrow against the scale that both CDFs round equal.
  return log_hi + jnp.log(jnp.maximum(one_minus_ratio, jnp.finfo(one_minus_ratio.dtype).tiny))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
  """log P(x) in nats, elementwise, of uint8 data scaled to [-1, 1] under N(means, e^(2·log_scales)).

  P(x) is the Gaussian mass of x's bin [x − 1/255, x + 1/255], with the first bin extended to −∞ and
  the last to +∞ so that the 256 probabilities sum to 1 (DDPM eq. 13). Arguments broadcast.
  """
  inv_scale = jnp.exp(-log_scales)
  hi = (x - means + _BIN_HALF_WIDTH) * inv_scale  # Standardized upper edge of x's bin.
  lo = (x - means - _BIN_HALF_WIDTH) * inv_scale
  log_cdf_hi = log_ndtr(hi)  # First bin: log Φ(hi).
  log_sf_lo = log_ndtr(-lo)  # Last bin: log(1 − Φ(lo)).
  # All three branches stay finite, so the unused ones cannot put NaNs into gradients.
  return jnp.where(x < -0.999, log_cdf_hi, jnp.where(x > 0.999, log_sf_lo, _log_normal_mass(lo, hi)))


def _posterior_coefficients(schedule: NoiseSchedule):
  """[T] arrays for q(x_{t−1} | x_t, x_0) (DDPM eq. 7): coef_x0, coef_xt, β̃_t, log β̃_t clipped.

  1 − ᾱ_t is recomputed as −expm1(Σ_{s≤t} log(1 − β_s)): in float32, 1 − alphas_cumprod keeps only
  ~4 digits at small t (ᾱ_0 = 1 − 10⁻⁴), and at t = 0 this makes coef_x0 = β_0 / (1 − ᾱ_0) = 1.
  """
  betas, abar = schedule.betas, schedule.alphas_cumprod
  one_minus_abar = -jnp.expm1(jnp.cumsum(jnp.log1p(-betas)))
  abar_prev = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])
  one_minus_abar_prev = jnp.concatenate([jnp.zeros((1,), abar.dtype), one_minus_abar[:-1]])
  coef_x0 = betas * jnp.sqrt(abar_prev) / one_minus_abar
  coef_xt = one_minus_abar_prev * jnp.sqrt(1.0 - betas) / one_minus_abar
  variance = betas * one_minus_abar_prev / one_minus_abar  # β̃_t; β̃_0 = 0.
  # β̃_0 = 0 has no log: improved-diffusion uses β̃_1 there (it is only ever the decoder's scale).
  log_variance_clipped = jnp.log(variance.at[0].set(variance[1]))
  return coef_x0, coef_xt, variance, log_variance_clipped


def q_posterior_mean_variance(schedule: NoiseSchedule, x0: jax.Array, x_t: jax.Array,
                              t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t·I) (DDPM eq. 6–7).

  μ̃_t = √ᾱ_{t−1}·β_t/(1 − ᾱ_t)·x_0 + √α_t·(1 − ᾱ_{t−1})/(1 − ᾱ_t)·x_t,  β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t.
  x0, x_t: [B, …]; t: [B] int32. Returns mean [B, …] and variance, log variance [B, 1, …, 1]; the log
  variance is clipped at t = 0 (β̃_0 = 0) to log β̃_1.
  """
  coef_x0, coef_xt, variance, log_variance = _posterior_coefficients(schedule)
  mean = _bcast(coef_x0[t], x_t) * x0 + _bcast(coef_xt[t], x_t) * x_t
  return mean, _bcast(variance[t], x_t), _bcast(log_variance[t], x_t)


def interpolate_log_variance(var_values: jax.Array, log_beta: jax.Array, log_beta_tilde: jax.Array) -> jax.Array:
  """Improved DDPM eq. 15 in log space: log Σ = frac·log β_t + (1 − frac)·log β̃_t, frac = (v + 1)/2.

  v is the network's raw output (guided-diffusion's "learned_range"): v = 1 gives β_t, v = −1 gives β̃_t,
  v = 0 their geometric mean; values outside [-1, 1] extrapolate. Arguments broadcast.
  """
  frac = (var_values + 1.0) / 2.0
  return frac * log_beta + (1.0 - frac) * log_beta_tilde


def learned_log_variance(schedule: NoiseSchedule, var_values: jax.Array, t: jax.Array) -> jax.Array:
  """log σ_t² of a learned-variance model: eq. 15 between log β̃_t (clipped: log β̃_1 at t = 0, since
  β̃_0 = 0) and log β_t, as guided-diffusion does. var_values: [B, …] raw network outputs; t: [B] int32.
  Returns [B, …]."""
  _, _, _, log_beta_tilde = _posterior_coefficients(schedule)
  return interpolate_log_variance(var_values, _bcast(jnp.log(schedule.betas)[t], var_values),
                                  _bcast(log_beta_tilde[t], var_values))


def p_mean_variance(model_output: jax.Array, x_t: jax.Array, t: jax.Array, schedule: NoiseSchedule,
                    prediction_type: str, model_variance: str, clip_x0: bool = False
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The model's p(x_{t−1} | x_t) = N(μ̃_t(x̂_0, x_t), σ_t²·I) (DDPM §3.2, improved DDPM §3.1).

  x̂_0 comes from the network's prediction channels via `to_eps_and_x0` (for ε-prediction the mean is
  then DDPM eq. 11), optionally clipped to [-1, 1]. σ_t² is β̃_t ("fixed_small"), β_t ("fixed_large") or
  learned ("learned": `learned_log_variance` of the output's last C channels, improved DDPM eq. 15).
  The fixed ones use β̃_1 at t = 0 for the log variance, and fixed_large also for the variance
  (improved-diffusion's convention; fixed_small's variance there is β̃_0 = 0).
  model_output: [B, …, C], or [B, …, 2·C] for a learned-variance model (a fixed variance then reads only
  its first C channels); x_t: [B, …, C]; t: [B] int32. Returns mean, x̂_0 [B, …], variance, log variance
  ([B, 1, …] for a fixed variance, [B, …] for the learned one).
  """
  if model_variance not in MODEL_VARIANCES:
    raise ValueError(f"model_variance={model_variance!r}; choose one of {MODEL_VARIANCES}")
  prediction, var_values = split_output(model_output, x_t)
  if model_variance == "learned" and var_values is None:
    raise ValueError(f"model_variance='learned' reads the variance channels of a learned-variance model, whose "
                     f"output has 2·C = {2 * x_t.shape[-1]} channels; this output has {model_output.shape[-1]}")
  _, x0_hat = to_eps_and_x0(prediction_type, prediction, x_t, schedule.alphas_cumprod[t])
  if clip_x0:
    x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
  mean, variance, log_variance = q_posterior_mean_variance(schedule, x0_hat, x_t, t)
  if model_variance == "learned":
    log_variance = learned_log_variance(schedule, var_values, t)
    variance = jnp.exp(log_variance)
  elif model_variance == "fixed_large":
    _, _, posterior_variance, _ = _posterior_coefficients(schedule)
    large = schedule.betas.at[0].set(posterior_variance[1])
    variance, log_variance = _bcast(large[t], x_t), _bcast(jnp.log(large)[t], x_t)
  return mean, variance, log_variance, x0_hat


def vlb_terms(model_output: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array,
              schedule: NoiseSchedule, prediction_type: str, model_variance: str,
              clip_x0: bool = False) -> jax.Array:
  """One term of the bound per example, in bits/dim: [B].

  t ≥ 1: KL(q(x_{t−1} | x_t, x_0) ‖ p(x_{t−1} | x_t)) (the paper's L_t); t = 0: the decoder's
  −log p(x_0 | x_t) with the model mean and scale e^(½·log σ_0²) (L_0). x0 is the clean data, x_t
  its noised version at t ([B] int32), model_output the network's output on (x_t, t) (C channels, or
  2·C for a learned-variance model; see `p_mean_variance`).
  """
  true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x0, x_t, t)
  mean, _, log_variance, _ = p_mean_variance(model_output, x_t, t, schedule, prediction_type,
                                             model_variance, clip_x0)
  kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / _LN2
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / _LN2
  return jnp.where(t == 0, decoder_nll, kl)


def prior_bpd(x0: jax.Array, schedule: NoiseSchedule) -> jax.Array:
  """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim: [B]. Has no parameters; ~0 when ᾱ_T ≈ 0."""
  abar_T = schedule.alphas_cumprod[-1]
  log_variance = jnp.log1p(-abar_T)
  kl = normal_kl(jnp.sqrt(abar_T) * x0, log_variance, 0.0, 0.0)
  return mean_flat(kl) / _LN2


def bits_per_dim(predict_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array,
                 schedule: NoiseSchedule, rng: jax.Array, *, prediction_type: str,
                 model_variance: str, num_timesteps: int | None = None,
                 clip_x0: bool = False) -> jax.Array:
  """The variational bound L_T + Σ_t L_t in bits/dim, one number per example: [B].

  predict_fn(x_t [B, …], t [B] int32) → output [B, …] in `prediction_type`'s parameterization (with
  the learned variance's C channels after the prediction's for model_variance='learned').
  x0: [B, …] uint8 data scaled to [-1, 1].

  num_timesteps=None: every term t = 0 … T−1 (one `lax.scan`, one network call per t). Term t uses
  x_t = q_sample(x0, ᾱ_t, ε_t) with ε_t = jax.random.normal(jax.random.split(rng, T)[t], x0.shape).
  The result is a single-sample Monte-Carlo estimate over ε (as in improved-diffusion's
  `calc_bpd_loop`), exact in the sum over t.

  num_timesteps=K < T: for each example, K distinct timesteps drawn uniformly without replacement,
  independently of the other examples, and L_T + (T/K)·Σ_k L_{t_k}. Each t is drawn with probability
  K/T, so this is an unbiased estimate of the full bound at K/T of the cost, with variance from the
  choice of t; independent draws per example make a batch mean average over B choices (one choice shared
  by the batch moved the digits bound between 7.5 and 11.3 bits/dim with the batching: the decoder term
  L_0 is large and enters ×T/K whenever t = 0 is drawn).
  `num_timesteps`, `prediction_type`, `model_variance` and `clip_x0` are static under jit.
  """
  T = schedule.num_timesteps
  batch = x0.shape[0]
  if num_timesteps is None:
    ts = jnp.arange(T, dtype=jnp.int32)
    keys = jax.random.split(rng, T)
    weight = 1.0
  else:
    if not 1 <= num_timesteps <= T:
      raise ValueError(f"num_timesteps={num_timesteps} must be in [1, {T}]")
    t_rng, noise_rng = jax.random.split(rng)
    draw = lambda key: jax.random.choice(key, T, (num_timesteps,), replace=False)
    ts = jax.vmap(draw)(jax.random.split(t_rng, batch)).astype(jnp.int32).T  # [K, B]
    keys = jax.random.split(noise_rng, num_timesteps)
    weight = T / num_timesteps

  def term(total, inputs):
    t, key = inputs  # t: [] (every term) or [B] (K terms drawn per example).
    t_batch = jnp.broadcast_to(t, (batch,))
    noise = jax.random.normal(key, x0.shape, x0.dtype)
    x_t = q_sample(x0, schedule.alphas_cumprod[t_batch], noise)
    output = predict_fn(x_t, t_batch)
    return total + vlb_terms(output, x0, x_t, t_batch, schedule, prediction_type, model_variance,
                             clip_x0), None

  total, _ = jax.lax.scan(term, jnp.zeros((batch,), jnp.float32), (ts, keys))
  return prior_bpd(x0, schedule) + weight * total
