"""Noise schedules: β_t for t = 0 … T−1 and the derived ᾱ_t = ∏_{s≤t} (1 − β_s).

Computed in float64 with numpy (as the papers' reference code does), stored as float32 jax arrays.
Notation: α_t = √ᾱ_t (signal scale), σ_t = √(1 − ᾱ_t) (noise scale), SNR_t = ᾱ_t / (1 − ᾱ_t).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UserError


@flax.struct.dataclass
class NoiseSchedule:
  """betas, alphas_cumprod: [T] float32."""

  betas: jax.Array
  alphas_cumprod: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                 max_beta: float = 0.999) -> np.ndarray:
  """DDPM (Ho et al. 2020): β linear from 1e-4 to 0.02 at T = 1000.

  For other T both ends are scaled by 1000/T (improved DDPM's convention), so that ᾱ_T stays ≈ 0;
  β is clipped at `max_beta` (which only matters for T < 21).
  """
  scale = 1000.0 / num_timesteps
  return np.minimum(np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64), max_beta)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
  """Stable Diffusion / LDM: √β linear from √0.00085 to √0.012."""
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Improved DDPM (Nichol & Dhariwal 2021, eq. 17): ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2) / ᾱ(0),
  β_t = 1 − ᾱ(t+1)/ᾱ(t), clipped at `max_beta`."""
  f = lambda t: np.cos((t / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
  t = np.arange(num_timesteps, dtype=np.float64)
  return np.minimum(1.0 - f(t + 1) / f(t), max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Algorithm 1: shift and scale √ᾱ so that √ᾱ_{T−1} = 0 (SNR 0: pure noise at the
  last step) while √ᾱ_0 is unchanged. Requires v or x0 prediction (ε is undefined where ᾱ = 0)."""
  sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_abar[0], sqrt_abar[-1]
  sqrt_abar = (sqrt_abar - last) * first / (first - last)
  abar = sqrt_abar**2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return 1.0 - alphas


BETA_SCHEDULES = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas}


def make_schedule(name: str, num_timesteps: int, *, zero_terminal_snr: bool = False) -> NoiseSchedule:
  if name not in BETA_SCHEDULES:
    raise UserError(f"unknown beta schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}")
  if num_timesteps < 2:
    raise UserError(f"num_timesteps={num_timesteps} must be at least 2")
  betas = BETA_SCHEDULES[name](num_timesteps)
  if zero_terminal_snr:
    betas = rescale_zero_terminal_snr(betas)
  alphas_cumprod = np.cumprod(1.0 - betas)
  return NoiseSchedule(jnp.asarray(betas, jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32))


def schedule_from_config(config) -> NoiseSchedule:
  d = config.diffusion
  return make_schedule(d.beta_schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr)


# Helpers, all elementwise on ᾱ (any shape).

def alpha(alpha_bar):
  """Signal scale √ᾱ."""
  return jnp.sqrt(alpha_bar)


def sigma(alpha_bar):
  """Noise scale √(1 − ᾱ)."""
  return jnp.sqrt(1.0 - alpha_bar)


def snr(alpha_bar):
  """Signal-to-noise ratio ᾱ / (1 − ᾱ)."""
  return alpha_bar / (1.0 - alpha_bar)


def log_snr(alpha_bar):
  """λ = log(ᾱ / (1 − ᾱ)) = 2·log(α/σ)."""
  return jnp.log(alpha_bar) - jnp.log1p(-alpha_bar)
