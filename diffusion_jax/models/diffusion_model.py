"""The network of a diffusion model: an optional conditioner (text encoder or class embedding) and a U-Net.

Parameters: {'unet': …} plus {'text_encoder': …} for text models or {'class_embedding': …} for class
models, and {'autoencoder': …} for latent models. `frozen_subtrees` names the parameter subtrees that do
not train (the latent autoencoder; a frozen pretrained text encoder, later); the optimizer leaves them
unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models.conditioning import ClassEmbedding
from diffusion_jax.models.text_encoder import TextEncoder
from diffusion_jax.models.unet import UNet


class DiffusionModel(nn.Module):
  """__call__(x_t [B, H, W, C], t [B], inputs {'tokens' | 'label' | nothing}) → prediction [B, H, W, C].

  `latent_shape` is the (H, W, C) the U-Net works on (the autoencoder's space). `encode_condition`
  and `denoise` are the two halves, so a sampler encodes the condition once and denoises many times.
  """

  unet: UNet
  latent_shape: tuple[int, int, int]
  text_encoder: TextEncoder | None = None
  class_embedding: ClassEmbedding | None = None
  frozen_subtrees: tuple[str, ...] = ()
  autoencoder: nn.Module | None = None  # A latent autoencoder (AutoencoderKL); its encode/decode run in the seam.

  @property
  def conditioning_kind(self) -> str:
    return "text" if self.text_encoder is not None else "class" if self.class_embedding is not None else "none"

  def encode_condition(self, inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Conditioning inputs → the U-Net's cond: {'context' [B, L, D], 'context_mask' [B, L], 'pooled' [B, D]}
    for text ('pooled' only with the U-Net's pooled projection), {'pooled' [B, D]} for classes, {} for
    unconditional models."""
    if self.text_encoder is not None:
      context, mask, pooled = self.text_encoder(inputs["tokens"])
      if not self.unet.pooled_projection:  # Stable Diffusion: cross-attention only.
        return {"context": context, "context_mask": mask}
      return {"context": context, "context_mask": mask, "pooled": pooled}
    if self.class_embedding is not None:
      return {"pooled": self.class_embedding(inputs["label"])}
    return {}

  def denoise(self, x_t: jax.Array, t: jax.Array, cond: dict[str, jax.Array], train: bool = False) -> jax.Array:
    """x_t [B, H, W, C], t [B] → prediction [B, H, W, C] (ε, v or x0, per the config)."""
    layers.check_shape("x_t", x_t, (None,) + tuple(self.latent_shape))
    return self.unet(x_t, t, cond.get("context"), cond.get("context_mask"), cond.get("pooled"), train)

  def __call__(self, x_t: jax.Array, t: jax.Array, inputs: dict[str, jax.Array], train: bool = False) -> jax.Array:
    if self.autoencoder is not None and self.is_initializing():  # Creates params['autoencoder'].
      self.autoencoder.encode(self.autoencoder.decode(jnp.zeros_like(x_t[:1])))
    return self.denoise(x_t, t, self.encode_condition(inputs), train=train)

  def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Zeros of the right shapes for `init`."""
    x = jnp.zeros((batch,) + tuple(self.latent_shape), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    inputs: dict[str, Any] = {}
    if self.text_encoder is not None:
      inputs["tokens"] = jnp.zeros((batch, self.text_encoder.max_length), jnp.int32)
    if self.class_embedding is not None:
      inputs["label"] = jnp.zeros((batch,), jnp.int32)
    return x, t, inputs
