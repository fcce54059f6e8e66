"""The U-Net of DDPM, ADM and Stable Diffusion, conditioned by cross-attention and/or a pooled embedding.

Per resolution level: `num_res_blocks` ResBlocks, each followed by `transformer_depth[level]` attention
blocks, then a downsample. The middle is ResBlock → attention → ResBlock; the way up mirrors the way
down with skip connections (one more ResBlock per level) and upsampling. The options select the papers'
variants:
- attention_type 'transformer' (Stable Diffusion's SpatialTransformer: LN → self-attention, LN →
  cross-attention to the text tokens if any, LN → GEGLU feed-forward) or 'self' (DDPM's / ADM's
  AttentionBlock: GN → q, k, v with bias → attention → output projection; no cross-attention);
- heads: a fixed number (`num_heads`: DDPM 1, SD 1.x 8) or a fixed width (`head_dim`: ADM, SD 2.x 64);
- scale_shift_norm (ADM's AdaGN: the timestep embedding scales and shifts the second norm);
- resblock_updown (ADM / BigGAN: resolution changes inside a ResBlock, not by a strided / upsampling conv);
- pooled_projection: a pooled condition (class embedding, pooled text) passes a linear map before it is
  added to the timestep embedding; without it, a pooled condition must have the embedding's width
  4·channels and is added as is (ADM's label embedding). SD's U-Net has no pooled input at all.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention as attention_lib
from diffusion_jax.models import layers
from diffusion_jax.models.traced_once import traced_once


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _resample(x: jax.Array, direction: str) -> jax.Array:
  """'up': nearest-neighbour ×2; 'down': 2×2 average pool; '': unchanged. [B, H, W, C] → [B, H', W', C]."""
  if direction == "up":  # A broadcast, not jax.image.resize's gather: its gradient is a sum, not a scatter.
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
  if direction == "down":
    return nn.avg_pool(x, (2, 2), (2, 2))
  return x


class ResBlock(nn.Module):
  """GN → SiLU → conv, + timestep embedding, GN → SiLU → dropout → conv (zero-init), + skip.

  scale_shift_norm (ADM's AdaGN): the embedding gives (scale, shift) and the second norm's output
  becomes GN(h)·(1 + scale) + shift instead of h + embedding. resample 'up' / 'down' (ADM's
  resblock_updown): both paths change resolution after the first GN → SiLU, before the first conv.
  """

  out_channels: int
  norm_groups: int
  dropout: float
  dtype: Any = jnp.float32
  scale_shift_norm: bool = False
  resample: str = ""

  @traced_once
  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    h = nn.silu(layers.group_norm(self.norm_groups, dtype=self.dtype, name="norm_1")(x))
    h, x = _resample(h, self.resample), _resample(x, self.resample)
    h = layers.conv(self.out_channels, dtype=self.dtype, name="conv_1")(h)
    emb_width = 2 * self.out_channels if self.scale_shift_norm else self.out_channels
    emb = layers.dense(emb_width, ("embed", "conv_out"), dtype=self.dtype, name="time_proj")(nn.silu(temb))
    emb = emb[:, None, None, :]
    if self.scale_shift_norm:
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = layers.group_norm(self.norm_groups, dtype=self.dtype, name="norm_2")(h) * (1 + scale) + shift
    else:
      h = layers.group_norm(self.norm_groups, dtype=self.dtype, name="norm_2")(h + emb)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = layers.conv(self.out_channels, zero_init=True, dtype=self.dtype, name="conv_2")(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, kernel_size=1, dtype=self.dtype, name="skip")(x)
    return x + h


class TransformerBlock(nn.Module):
  """LN → self-attn, LN → cross-attn to `context` (if any), LN → GEGLU feed-forward; each residual."""

  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None, context_mask: jax.Array | None) -> jax.Array:
    width = x.shape[-1]
    attn = lambda name: layers.MultiHeadAttention(self.num_heads, self.head_dim, self.dtype, self.attention,
                                                  name=name)
    x = x + attn("self_attn")(layers.layer_norm(dtype=self.dtype, name="ln_self")(x))
    if context is not None:  # Class-conditional and unconditional models have no cross-attention.
      x = x + attn("cross_attn")(layers.layer_norm(dtype=self.dtype, name="ln_cross")(x), context, context_mask)
    h = layers.layer_norm(dtype=self.dtype, name="ln_ff")(x)
    h = layers.GEGLU(4 * width, dtype=self.dtype, name="ff_in")(h)
    return x + layers.dense(width, ("mlp", "embed"), dtype=self.dtype, name="ff_out")(h)


def _heads(channels: int, num_heads: int, head_dim: int) -> tuple[int, int]:
  """(heads, head width) of attention over `channels`: `num_heads` fixed if > 0, else width `head_dim`."""
  if num_heads > 0:
    return num_heads, channels // num_heads
  return max(channels // head_dim, 1), head_dim


class SpatialTransformer(nn.Module):
  """GN → proj_in → `depth` TransformerBlocks over the H·W tokens → proj_out (zero-init), + input."""

  depth: int
  head_dim: int
  norm_groups: int
  use_linear_projection: bool
  dtype: Any = jnp.float32
  num_heads: int = 0
  attention: str = "xla"

  @traced_once
  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None, context_mask: jax.Array | None) -> jax.Array:
    b, hgt, wid, ch = x.shape
    h = layers.group_norm(self.norm_groups, dtype=self.dtype, name="norm")(x)
    if self.use_linear_projection:
      proj = lambda name, zero: layers.dense(ch, ("mlp", "embed") if zero else ("embed", "mlp"),
                                            zero_init=zero, dtype=self.dtype, name=name)
    else:
      proj = lambda name, zero: layers.conv(ch, kernel_size=1, zero_init=zero, dtype=self.dtype, name=name)
    h = layers.flatten_spatial(proj("proj_in", False)(h))
    heads, head_dim = _heads(ch, self.num_heads, self.head_dim)
    for i in range(self.depth):
      h = TransformerBlock(heads, head_dim, self.dtype, self.attention, name=f"block_{i}")(h, context, context_mask)
    h = proj("proj_out", True)(h.reshape(b, hgt, wid, ch))
    return x + h


class AttentionBlock(nn.Module):
  """DDPM's / ADM's self-attention over the H·W positions: GN → q, k, v (with bias) → multi-head
  attention → output projection (zero-init), + input; `depth` of them in a row. No cross-attention."""

  depth: int
  head_dim: int
  norm_groups: int
  use_linear_projection: bool  # Unused: q, k, v are 1×1 maps either way (the signature of SpatialTransformer).
  dtype: Any = jnp.float32
  num_heads: int = 0
  attention: str = "xla"

  @traced_once
  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None, context_mask: jax.Array | None) -> jax.Array:
    del context, context_mask
    b, hgt, wid, ch = x.shape
    heads, head_dim = _heads(ch, self.num_heads, self.head_dim)
    for i in range(self.depth):
      h = layers.flatten_spatial(layers.group_norm(self.norm_groups, dtype=self.dtype, name=f"norm_{i}")(x))
      split = lambda y: y.reshape(b, hgt * wid, heads, head_dim)
      q, k, v = (split(layers.dense(heads * head_dim, ("embed", "heads"), dtype=self.dtype, name=f"{n}_{i}")(h))
                 for n in ("query", "key", "value"))
      out = attention_lib.dot_product(q, k, v, None, self.attention).reshape(b, hgt * wid, heads * head_dim)
      out = layers.dense(ch, ("heads", "embed"), zero_init=True, dtype=self.dtype, name=f"out_{i}")(out)
      x = x + out.reshape(b, hgt, wid, ch)
    return x


class UNet(nn.Module):
  """ε/v/x0-prediction network.

  __call__(x_t [B, H, W, C] in model units, t [B] timesteps, context [B, L, D] and context_mask [B, L]
  (cross-attention; None: none), pooled [B, D] (added to the timestep embedding; None: nothing))
  → [B, H, W, out_channels] float32.
  """

  out_channels: int
  channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  transformer_depth: Sequence[int]
  mid_transformer_depth: int
  head_dim: int
  norm_groups: int
  dropout: float
  use_linear_projection: bool
  dtype: Any = jnp.float32
  remat_policy: str = "none"
  attention_type: str = "transformer"  # 'transformer' (SD) or 'self' (DDPM, ADM); see the module docstring.
  num_heads: int = 0  # > 0: this many heads at every width; 0: heads of width head_dim.
  scale_shift_norm: bool = False
  resblock_updown: bool = False
  pooled_projection: bool = True
  attention: str = "xla"  # The attention kernel (models/attention.py).

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None, pooled: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    temb_dim = 4 * self.channels
    temb = layers.sinusoidal_embedding(t, self.channels)
    temb = layers.dense(temb_dim, (None, "mlp"), dtype=self.dtype, name="time_mlp_1")(temb)
    temb = layers.dense(temb_dim, ("mlp", "embed"), dtype=self.dtype, name="time_mlp_2")(nn.silu(temb))
    if pooled is not None:  # The pooled condition (text or class embedding).
      if self.pooled_projection:
        temb = temb + layers.dense(temb_dim, ("mlp", "embed"), dtype=self.dtype, name="pooled_text_proj")(pooled)
      else:  # ADM: the label embedding has the timestep embedding's width and is added as is.
        layers.check_shape("pooled (added without a projection)", pooled, (temb.shape[0], temb_dim))
        temb = temb + pooled.astype(temb.dtype)
    if context is not None:
      context = context.astype(self.dtype)

    res_block, transformer = ResBlock, ATTENTION_TYPES[self.attention_type]
    if self.remat_policy != "none":  # Recompute block activations in the backward pass.
      policy = REMAT_POLICIES[self.remat_policy]
      res_block = nn.remat(ResBlock, static_argnums=(3,), policy=policy)  # `train` (self is 0).
      transformer = nn.remat(transformer, policy=policy)
    res = lambda ch, name, resample="": res_block(ch, self.norm_groups, self.dropout, self.dtype,
                                                  self.scale_shift_norm, resample, name=name)
    attn = lambda depth, name: transformer(depth, self.head_dim, self.norm_groups, self.use_linear_projection,
                                           self.dtype, self.num_heads, self.attention, name=name)
    h = layers.conv(self.channels, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    h = nn.with_logical_constraint(h, ("batch", None, None, "conv_out"))
    skips = [h]
    last = len(self.channel_mult) - 1
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = res(self.channels * mult, f"down_{level}_res_{i}")(h, temb, train)
        if self.transformer_depth[level]:
          h = attn(self.transformer_depth[level], f"down_{level}_attn_{i}")(h, context, context_mask)
        skips.append(h)
      if level != last:
        if self.resblock_updown:
          h = res(h.shape[-1], f"down_{level}_downsample", "down")(h, temb, train)
        else:
          h = layers.conv(h.shape[-1], strides=2, dtype=self.dtype, name=f"down_{level}_downsample")(h)
        skips.append(h)

    h = res(h.shape[-1], "mid_res_1")(h, temb, train)
    if self.mid_transformer_depth:
      h = attn(self.mid_transformer_depth, "mid_attn")(h, context, context_mask)
    h = res(h.shape[-1], "mid_res_2")(h, temb, train)

    for level in reversed(range(len(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(self.channels * self.channel_mult[level], f"up_{level}_res_{i}")(h, temb, train)
        if self.transformer_depth[level]:
          h = attn(self.transformer_depth[level], f"up_{level}_attn_{i}")(h, context, context_mask)
      if level != 0:
        if self.resblock_updown:
          h = res(h.shape[-1], f"up_{level}_upsample", "up")(h, temb, train)
        else:
          h = layers.conv(h.shape[-1], dtype=self.dtype, name=f"up_{level}_upsample")(_resample(h, "up"))

    h = nn.silu(layers.group_norm(self.norm_groups, dtype=self.dtype, name="norm_out")(h))
    out = layers.conv(self.out_channels, zero_init=True, dtype=self.dtype, name="conv_out")(h)
    return out.astype(jnp.float32)


ATTENTION_TYPES = {"transformer": SpatialTransformer, "self": AttentionBlock}
