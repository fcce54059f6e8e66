"""Noise schedules: β_t for t = 0 … T−1 and the derived ᾱ_t = ∏_{s≤t} (1 − β_s).

Computed in float64 with numpy (as the papers' reference code does), stored as float32 jax arrays.
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


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """DDPM (Ho et al. 2020): β linear from 1e-4 to 0.02."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Improved DDPM (Nichol & Dhariwal 2021, eq. 17): ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2) / ᾱ(0),
  β_t = 1 − ᾱ(t+1)/ᾱ(t), clipped at `max_beta`."""
  f = lambda t: np.cos((t / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
  t = np.arange(num_timesteps, dtype=np.float64)
  return np.minimum(1.0 - f(t + 1) / f(t), max_beta)


_BETAS = {"linear": linear_betas, "cosine": cosine_betas}


def make_schedule(name: str, num_timesteps: int) -> NoiseSchedule:
  if name not in _BETAS:
    raise UserError(f"unknown beta schedule {name!r}; choose one of {sorted(_BETAS)}")
  betas = _BETAS[name](num_timesteps)
  alphas_cumprod = np.cumprod(1.0 - betas)
  return NoiseSchedule(jnp.asarray(betas, jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32))
