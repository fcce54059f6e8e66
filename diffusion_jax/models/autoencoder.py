"""The autoencoder seam: the space the diffusion runs in.

Training encodes images before the loss (`encode`), sampling decodes the sampler's output (`decode`),
each in one place. `pixels` is the identity: the model works on the images themselves, mapped from
uint8 [0, 255] to float [-1, 1]. A latent autoencoder (Stable Diffusion's AutoencoderKL) will plug in
here with the same three members, mapping images to latents of `latent_shape`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("pixels",)


class PixelSpace:
  """Identity autoencoder: images [B, H, W, C] uint8 ↔ x [B, H, W, C] float32 in [-1, 1]."""

  kind = "pixels"

  def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(image_shape)

  def encode(self, images_uint8: jax.Array) -> jax.Array:
    """uint8 (or float) [0, 255] → float32 [-1, 1]."""
    return jnp.asarray(images_uint8).astype(jnp.float32) / 127.5 - 1.0

  def decode(self, x: jax.Array) -> jax.Array:
    """Model space → images float32 in [-1, 1] (clipped, as pixels are)."""
    return jnp.clip(x, -1.0, 1.0)


def create(kind: str) -> PixelSpace:
  if kind != "pixels":
    raise ValueError(f"unknown autoencoder {kind!r}; choose one of {list(KINDS)}")
  return PixelSpace()
