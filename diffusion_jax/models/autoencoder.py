"""The autoencoder seam: the space the diffusion runs in.

Training encodes images before the loss (`encode`), sampling decodes the sampler's output (`decode`),
each in one place; both take the model's parameters, since a latent autoencoder's weights live in the
train state (a frozen subtree 'autoencoder', checkpointed with the rest).
- `pixels`: the identity; the model works on the images themselves, mapped from uint8 [0, 255] to
  float [-1, 1].
- `kl`: Stable Diffusion's AutoencoderKL (`autoencoder_kl.py`): images → latents of shape
  (H/f, W/f, latent_channels), multiplied by `scale_factor` (SD: 0.18215) so that they have about unit
  variance; training draws a latent from the encoder's posterior, evaluation uses its mean.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.models.autoencoder_kl import AutoencoderKL

KINDS = ("pixels", "kl")


def _to_unit_range(images: jax.Array) -> jax.Array:
  """uint8 (or float) [0, 255] → float32 [-1, 1]."""
  return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


class PixelSpace:
  """Identity autoencoder: images [B, H, W, C] uint8 ↔ x [B, H, W, C] float32 in [-1, 1]."""

  kind = "pixels"
  module = None  # No parameters.

  def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(image_shape)

  def encode(self, params: Any, images_uint8: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """uint8 (or float) [0, 255] → float32 [-1, 1]."""
    del params, rng
    return _to_unit_range(images_uint8)

  def decode(self, params: Any, x: jax.Array) -> jax.Array:
    """Model space → images float32 in [-1, 1] (clipped, as pixels are)."""
    del params
    return jnp.clip(x, -1.0, 1.0)


class LatentSpace:
  """AutoencoderKL latents: images [B, H, W, C] uint8 ↔ z [B, H/f, W/f, latent_channels] float32.

  `module` is the (unbound) AutoencoderKL; its parameters are `params['autoencoder']` of the model.
  """

  kind = "kl"

  def __init__(self, module: AutoencoderKL, scale_factor: float):
    self.module = module
    self.scale_factor = scale_factor

  def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    h, w, _ = image_shape
    f = self.module.downsample_factor
    return (h // f, w // f, self.module.latent_channels)

  def encode(self, params: Any, images_uint8: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """A latent drawn from the encoder's posterior N(mean, exp(logvar)) (its mean when rng is None),
    times scale_factor."""
    mean, logvar = self.module.apply({"params": params["autoencoder"]}, _to_unit_range(images_uint8),
                                     method=AutoencoderKL.encode)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    return z * self.scale_factor

  def decode(self, params: Any, z: jax.Array) -> jax.Array:
    """Scaled latents → images float32 in [-1, 1] (clipped)."""
    images = self.module.apply({"params": params["autoencoder"]}, z / self.scale_factor,
                               method=AutoencoderKL.decode)
    return jnp.clip(images, -1.0, 1.0)


def create(config) -> PixelSpace | LatentSpace:
  """The autoencoder of `config.model.autoencoder` (and `config.model.vae` for 'kl')."""
  kind = config.model.autoencoder
  if kind == "pixels":
    return PixelSpace()
  if kind == "kl":
    vae = config.model.vae
    module = AutoencoderKL(tuple(vae.block_channels), vae.layers_per_block, vae.latent_channels,
                           config.dataset.channels, vae.norm_groups, jnp.dtype(config.model.dtype))
    return LatentSpace(module, vae.scale_factor)
  raise ValueError(f"unknown autoencoder {kind!r}; choose one of {list(KINDS)}")
