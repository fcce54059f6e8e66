"""Transformer text encoder: token ids → per-token embeddings, padding mask and pooled vector."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import initializers, layers
from diffusion_jax.text.tokenizer import padding_mask


class EncoderLayer(nn.Module):
  """Pre-LayerNorm transformer layer with bidirectional, padding-masked self-attention."""

  num_heads: int
  mlp_ratio: int
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = layers.layer_norm(dtype=self.dtype, name="ln_attn")(x)
    x = x + layers.MultiHeadAttention(self.num_heads, width // self.num_heads, self.dtype, self.attention,
                                      name="attn")(h, mask=mask)
    h = layers.layer_norm(dtype=self.dtype, name="ln_mlp")(x)
    h = layers.dense(width * self.mlp_ratio, ("embed", "mlp"), dtype=self.dtype, name="mlp_in")(h)
    h = layers.dense(width, ("mlp", "embed"), dtype=self.dtype, name="mlp_out")(nn.gelu(h))
    return x + h


class TextEncoder(nn.Module):
  """tokens [B, L] int32 → (context [B, L, width], mask [B, L] bool, pooled [B, width]).

  `pooled` is the mean of the real (non-PAD) token embeddings after the final LayerNorm.
  """

  vocab_size: int
  max_length: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32
  attention: str = "xla"  # The kernel: see models/attention.py.

  @nn.compact
  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    layers.check_shape("tokens", tokens, (None, self.max_length))
    mask = padding_mask(tokens)
    embed = self.param("token_embedding", initializers.normal(0.02, ("vocab", "embed")),
                       (self.vocab_size, self.width))
    pos = self.param("position_embedding", initializers.normal(0.01, ("length", "embed")),
                     (self.max_length, self.width))
    x = (jnp.take(embed, tokens, axis=0) + pos[None]).astype(self.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    for i in range(self.depth):
      x = EncoderLayer(self.num_heads, self.mlp_ratio, self.dtype, self.attention, name=f"layer_{i}")(x, mask)
    x = layers.layer_norm(dtype=self.dtype, name="ln_final")(x)
    weights = mask.astype(x.dtype)[..., None]
    pooled = (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
    return x, mask, pooled
