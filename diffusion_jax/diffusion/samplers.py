"""Samplers as one `jax.lax.scan` over timesteps, with classifier-free guidance in every step.

The model is any `denoise_fn(x_t [B, …, C], t [B], cond) → output [B, …, C]` (ε, v or x0 per
`prediction_type`), or [B, …, 2·C] for a model that learns its variance (improved DDPM, Nichol &
Dhariwal 2021: the prediction's C channels, then the C values v of eq. 15), where `cond` is a pytree
whose leaves have a leading batch axis (for the text model: the encoded prompt). Each step calls it
once on [x; x] with [cond; uncond], so the conditional and unconditional predictions come from one
batched forward pass.

Guidance (Ho & Salimans 2022) with scale s: ε̂ = ε_u + s·(ε_c − ε_u). s = 1 is the plain
conditional model, s = 0 the unconditional one; the paper's w is s − 1. `guidance_scale` is an
array [B], so one compiled sampler sweeps many scales. Guidance combines the prediction channels only;
a learned variance comes from the conditional branch (as GLIDE does).

Samplers: DDPM ancestral (Ho et al. 2020, on any timestep subset; with a learned variance, eq. 15 of
improved DDPM between the β and β̃ of the visited subset, §4), DDIM with η (Song et al. 2021),
DPM-Solver++(2M) (Lu et al. 2022); DDIM and DPM-Solver++ read only the prediction channels.
Everything about the step sequence is static (numpy), so a sampler compiles once per (shapes, options).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import vlb
from diffusion_jax.diffusion.losses import _bcast, split_output, to_eps_and_x0
from diffusion_jax.diffusion.schedules import NoiseSchedule
from diffusion_jax.errors import UserError

DenoiseFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

SAMPLERS = ("ddim", "ddpm", "dpm_solver_pp_2m")
SPACINGS = ("linspace", "leading", "trailing")
X0_CLIPPINGS = ("static", "dynamic", "none")
DDPM_VARIANCES = ("small", "large")


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """Static sampler settings (hashable: part of the compilation key).

  guidance_interval: (lo, hi) as fractions of T; guidance applies at steps with lo·T ≤ t ≤ hi·T
    (Kynkäänniemi et al. 2024), elsewhere the conditional prediction is used alone.
  guidance_rescale: φ of Lin et al. 2023 (0 = off, 0.7 recommended with zero-terminal-SNR).
  x0_clipping: 'static' clips x̂0 to [-1, 1]; 'dynamic' is Imagen's dynamic thresholding at
    `dynamic_threshold_percentile` of |x̂0|; 'none' leaves it.
  ddpm_variance: the DDPM sampler's σ², 'small' (β̃) or 'large' (β), for fixed-variance models; a model
    that outputs a learned variance (2·C channels) samples with that instead.
  """

  sampler: str = "ddim"
  num_steps: int = 50
  spacing: str = "linspace"
  eta: float = 0.0
  ddpm_variance: str = "small"
  prediction_type: str = "eps"
  x0_clipping: str = "static"
  dynamic_threshold_percentile: float = 0.995
  guidance_rescale: float = 0.0
  guidance_interval: tuple[float, float] = (0.0, 1.0)

  def validate(self, num_timesteps: int) -> None:
    for name, value, allowed in (("sampler", self.sampler, SAMPLERS), ("spacing", self.spacing, SPACINGS),
                                 ("x0_clipping", self.x0_clipping, X0_CLIPPINGS),
                                 ("ddpm_variance", self.ddpm_variance, DDPM_VARIANCES)):
      if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; choose one of {list(allowed)}")
    max_steps = num_timesteps - 1 if self.sampler == "dpm_solver_pp_2m" else num_timesteps
    if not 1 <= self.num_steps <= max_steps:
      raise UserError(f"steps={self.num_steps} must be in [1, {max_steps}] for {self.sampler}")
    # Written so that NaN fails every check (NaN compares false): a NaN setting must never sample.
    if not 0.0 <= self.eta <= 1.0:
      raise UserError(f"eta={self.eta} must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like noise)")
    if not 0.0 <= self.guidance_rescale <= 1.0:
      raise UserError(f"guidance_rescale={self.guidance_rescale} must be in [0, 1] (0 = off)")
    lo, hi = self.guidance_interval
    if not 0.0 <= lo <= hi <= 1.0:
      raise UserError(f"guidance_interval={self.guidance_interval} must satisfy 0 <= lo <= hi <= 1")
    if not 0.0 < self.dynamic_threshold_percentile <= 1.0:
      raise UserError(f"dynamic_threshold_percentile={self.dynamic_threshold_percentile} must be in (0, 1]")


def timesteps(spacing: str, num_timesteps: int, num_steps: int) -> np.ndarray:
  """Decreasing int32 timesteps to visit (the conventions of diffusers, Lin et al. 2023 Table 2).

  T = 1000, 10 steps: linspace → 999, 888, …, 111, 0; leading → 900, 800, …, 0;
  trailing → 999, 899, …, 99.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise UserError(f"steps={num_steps} must be in [1, {num_timesteps}]")
  if spacing == "linspace":
    ts = np.round(np.linspace(0, num_timesteps - 1, num_steps))
  elif spacing == "leading":
    ts = np.arange(num_steps) * (num_timesteps // num_steps)
  elif spacing == "trailing":
    ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)) - 1
  else:
    raise UserError(f"unknown spacing {spacing!r}; choose one of {list(SPACINGS)}")
  return np.sort(ts.astype(np.int32))[::-1].copy()


def guided_output(denoise_fn: DenoiseFn, x: jax.Array, t: jax.Array, cond: Any, uncond: Any,
                  guidance_scale: jax.Array, guidance_rescale: float = 0.0) -> jax.Array:
  """u + s·(c − u) from one forward pass on the doubled batch. guidance_scale: [B]. uncond=None: c alone.

  Written as c + (s − 1)·(c − u): the same number, but exactly c at s = 1 in floating point.
  With φ = guidance_rescale > 0 the result's per-sample standard deviation is pulled towards that of
  c (Lin et al. 2023, eq. 15–16): out = g + φ·(g·std(c)/std(g) − g).
  A learned-variance output (2·C channels, see `split_output`) is guided on its prediction channels
  only; its variance channels are the conditional branch's (GLIDE's convention), so the result is
  [guided prediction, v_c].
  """
  if uncond is None:  # An unconditional model: nothing to guide, one forward pass.
    return denoise_fn(x, t, cond)
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)
  out = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
  out_c, out_u = jnp.split(out, 2)
  out_c, var_c = split_output(out_c, x)
  out_u, _ = split_output(out_u, x)
  guided = out_c + (_bcast(guidance_scale, x) - 1.0) * (out_c - out_u)
  if guidance_rescale:
    axes = tuple(range(1, x.ndim))
    ratio = jnp.std(out_c, axis=axes, keepdims=True) / jnp.maximum(jnp.std(guided, axis=axes, keepdims=True), 1e-12)
    guided = guided + guidance_rescale * (guided * ratio - guided)
  return guided if var_c is None else jnp.concatenate([guided, var_c], axis=-1)


def dynamic_threshold(x0: jax.Array, percentile: float) -> jax.Array:
  """Imagen (Saharia et al. 2022): s = max(1, p-th percentile of |x̂0| per sample); x̂0 ← clip(x̂0, ±s)/s."""
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
  s = _bcast(s, x0)
  return jnp.clip(x0, -s, s) / s


def _step_table(schedule: NoiseSchedule, options: SamplerOptions) -> dict[str, np.ndarray]:
  """Per-step constants, float64 numpy: t, ᾱ_t, ᾱ_prev (1 after the last step), λ, h, r, and the
  respaced chain's log β and log β̃ (for a learned variance).

  The visited steps form a shorter chain (improved DDPM §4): β'_k = 1 − ᾱ_t/ᾱ_prev and
  β̃'_k = (1 − ᾱ_prev)/(1 − ᾱ_t)·β'_k, computed from Σ log(1 − β_s) so that small β keep their digits.
  The last step's β̃' is 0 (it lands on the data); as for the full chain, its log is clipped to the
  second-to-last step's (the chain's β̃'_1), and that step adds no noise anyway.
  """
  ts = timesteps(options.spacing, schedule.num_timesteps, options.num_steps)
  if options.sampler == "dpm_solver_pp_2m" and options.spacing != "trailing":
    # As diffusers does: lay out n + 1 points and drop t = 0, so that the last step goes from t > 0
    # straight to the data. A second-order step into t = 0 (ᾱ ≈ 1, λ ≈ +∞) would extrapolate
    # with a tiny r = h_prev/h and lose accuracy at small step counts.
    ts = timesteps(options.spacing, schedule.num_timesteps, options.num_steps + 1)[:-1]
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  a_t = abar[ts]
  a_prev = np.append(abar[ts[1:]], 1.0)
  with np.errstate(divide="ignore"):
    lam = 0.5 * (np.log(a_t) - np.log1p(-a_t))  # λ = log(α/σ); −∞ at ᾱ = 0.
    lam_prev = 0.5 * (np.log(a_prev) - np.log1p(-a_prev))  # +∞ at ᾱ = 1.
  h = lam_prev - lam
  h_before = np.append(np.nan, h[:-1])
  with np.errstate(divide="ignore", invalid="ignore"):
    r = h_before / h
    # log ᾱ_t = Σ_{s≤t} log(1 − β_s) in float64 (−∞ where a zero-terminal-SNR β is 1).
    log_abar = np.cumsum(np.log1p(-np.asarray(schedule.betas, np.float64)))
    log_a_t, log_a_prev = log_abar[ts], np.append(log_abar[ts[1:]], 0.0)
    beta = -np.expm1(log_a_t - log_a_prev)  # β' = 1 − ᾱ_t/ᾱ_prev.
    beta_tilde = beta * np.expm1(log_a_prev) / np.expm1(log_a_t)  # β̃' = (1 − ᾱ_prev)/(1 − ᾱ_t)·β'.
    log_beta, log_beta_tilde = np.log(beta), np.log(beta_tilde)
  if len(ts) > 1:
    log_beta_tilde[-1] = log_beta_tilde[-2]
  else:  # One step straight to the data: no noise is added; any finite value will do.
    log_beta_tilde[-1] = log_beta[-1]
  return {"t": ts, "a_t": a_t, "a_prev": a_prev, "h": h, "r": r, "log_beta": log_beta,
          "log_beta_tilde": log_beta_tilde,
          "first": np.arange(len(ts)) == 0, "last": np.arange(len(ts)) == len(ts) - 1}


def make_step_fn(denoise_fn: DenoiseFn, cond: Any, uncond: Any, guidance_scale: jax.Array,
                 options: SamplerOptions, num_timesteps: int):
  """The scan body: ((x, x̂0 of the previous step), (step constants, key)) → ((x_prev, x̂0), None)."""
  lo, hi = options.guidance_interval

  def step(carry, inputs):
    x, x0_before = carry
    c, key = inputs
    batch = x.shape[0]
    t = jnp.full((batch,), c["t"], jnp.int32)
    a_t = jnp.full((batch,), c["a_t"], jnp.float32)
    in_interval = (c["t"] >= lo * num_timesteps) & (c["t"] <= hi * num_timesteps)
    scale = jnp.where(in_interval, guidance_scale, 1.0)
    output = guided_output(denoise_fn, x, t, cond, uncond, scale, options.guidance_rescale)
    output, var_values = split_output(output, x)  # var_values: None unless the model learns Σ.
    eps, x0 = to_eps_and_x0(options.prediction_type, output, x, a_t)
    if options.x0_clipping != "none":
      x0 = jnp.clip(x0, -1.0, 1.0) if options.x0_clipping == "static" else dynamic_threshold(
          x0, options.dynamic_threshold_percentile)
      eps = (x - jnp.sqrt(_bcast(a_t, x)) * x0) / jnp.sqrt(1.0 - _bcast(a_t, x))
    a_t, a_prev = c["a_t"], c["a_prev"]
    noise = jax.random.normal(key, x.shape, x.dtype)

    if options.sampler == "ddim":  # Song et al. 2021, eq. 12 (η = 1: DDPM-like noise).
      sig = options.eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
      x_new = (jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_prev - sig**2, 0.0)) * eps + sig * noise)
    elif options.sampler == "ddpm":  # Posterior q(x_prev | x_t, x̂0) with β' = 1 − ᾱ_t/ᾱ_prev (DDPM eq. 6–7).
      beta = 1.0 - a_t / a_prev
      mean = (jnp.sqrt(a_prev) * beta / (1.0 - a_t)) * x0 + (jnp.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_t)) * x
      if var_values is None:
        var = beta * (1.0 - a_prev) / (1.0 - a_t) if options.ddpm_variance == "small" else beta
        x_new = mean + jnp.where(c["last"], 0.0, jnp.sqrt(var)) * noise
      else:  # The learned Σ (improved DDPM eq. 15) between this chain's β̃' and β'; ddpm_variance is unused.
        log_var = vlb.interpolate_log_variance(var_values, c["log_beta"], c["log_beta_tilde"])
        x_new = mean + jnp.where(c["last"], 0.0, jnp.exp(0.5 * log_var)) * noise
    else:  # DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (data prediction, multistep).
      r = jnp.where(c["first"] | c["last"], jnp.inf, c["r"])  # First order on the first and last step.
      d = x0 + (x0 - x0_before) / (2.0 * r)
      x_new = jnp.where(
          c["last"], d,
          jnp.sqrt((1.0 - a_prev) / (1.0 - a_t)) * x - jnp.sqrt(a_prev) * jnp.expm1(-c["h"]) * d)
    return (x_new.astype(x.dtype), x0), None

  return step


def step_inputs(schedule: NoiseSchedule, options: SamplerOptions, rng: jax.Array) -> tuple[Any, jax.Array]:
  """What the scan iterates over: per-step constants (each [num_steps]) and keys [num_steps, 2]."""
  table = _step_table(schedule, options)
  consts = {k: jnp.asarray(v, jnp.float32 if v.dtype == np.float64 else v.dtype) for k, v in table.items()}
  return consts, jax.random.split(rng, len(table["t"]))


def sample(denoise_fn: DenoiseFn, schedule: NoiseSchedule, x_T: jax.Array, cond: Any, uncond: Any,
           guidance_scale: jax.Array, rng: jax.Array, options: SamplerOptions) -> jax.Array:
  """Runs the sampler from x_T [B, H, W, C] (standard normal) to x̂0 [B, H, W, C]. guidance_scale: [B]."""
  options.validate(schedule.num_timesteps)
  step = make_step_fn(denoise_fn, cond, uncond, guidance_scale, options, schedule.num_timesteps)
  (x0, _), _ = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T)), step_inputs(schedule, options, rng))
  return x0
