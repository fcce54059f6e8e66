"""The U-Net (DDPM / Stable Diffusion layout), conditioned by cross-attention and/or a pooled embedding.

Per resolution level: `num_res_blocks` ResBlocks, each followed by `transformer_depth[level]`
transformer blocks (self-attention, cross-attention to the text tokens if the model has text, GEGLU
feed-forward), then a
stride-2 downsample. The middle is ResBlock → transformer → ResBlock; the way up mirrors the way
down with skip connections (one more ResBlock per level) and nearest-neighbour upsampling.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class ResBlock(nn.Module):
  """GN → SiLU → conv, + timestep embedding, GN → SiLU → dropout → conv (zero-init), + skip."""

  out_channels: int
  norm_groups: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    h = nn.silu(layers.group_norm(self.norm_groups, dtype=self.dtype, name="norm_1")(x))
    h = layers.conv(self.out_channels, dtype=self.dtype, name="conv_1")(h)
    h = h + layers.dense(self.out_channels, ("embed", "conv_out"), dtype=self.dtype,
                         name="time_proj")(nn.silu(temb))[:, None, None, :]
    h = nn.silu(layers.group_norm(self.norm_groups, dtype=self.dtype, name="norm_2")(h))
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

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None, context_mask: jax.Array | None) -> jax.Array:
    width = x.shape[-1]
    attn = lambda name: layers.MultiHeadAttention(self.num_heads, self.head_dim, self.dtype, name=name)
    x = x + attn("self_attn")(layers.layer_norm(dtype=self.dtype, name="ln_self")(x))
    if context is not None:  # Class-conditional and unconditional models have no cross-attention.
      x = x + attn("cross_attn")(layers.layer_norm(dtype=self.dtype, name="ln_cross")(x), context, context_mask)
    h = layers.layer_norm(dtype=self.dtype, name="ln_ff")(x)
    value, gate = jnp.split(layers.dense(8 * width, ("embed", "mlp"), dtype=self.dtype, name="ff_in")(h), 2, -1)
    return x + layers.dense(width, ("mlp", "embed"), dtype=self.dtype, name="ff_out")(value * nn.gelu(gate))


class SpatialTransformer(nn.Module):
  """GN → proj_in → `depth` TransformerBlocks over the H·W tokens → proj_out (zero-init), + input."""

  depth: int
  head_dim: int
  norm_groups: int
  use_linear_projection: bool
  dtype: Any = jnp.float32

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
    for i in range(self.depth):
      h = TransformerBlock(max(ch // self.head_dim, 1), self.head_dim, self.dtype, name=f"block_{i}")(
          h, context, context_mask)
    h = proj("proj_out", True)(h.reshape(b, hgt, wid, ch))
    return x + h


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

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None, pooled: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    temb_dim = 4 * self.channels
    temb = layers.sinusoidal_embedding(t, self.channels)
    temb = layers.dense(temb_dim, (None, "mlp"), dtype=self.dtype, name="time_mlp_1")(temb)
    temb = layers.dense(temb_dim, ("mlp", "embed"), dtype=self.dtype, name="time_mlp_2")(nn.silu(temb))
    if pooled is not None:  # The pooled condition (text or class embedding); the name predates classes.
      temb = temb + layers.dense(temb_dim, ("mlp", "embed"), dtype=self.dtype, name="pooled_text_proj")(pooled)
    if context is not None:
      context = context.astype(self.dtype)

    res_block, transformer = ResBlock, SpatialTransformer
    if self.remat_policy != "none":  # Recompute block activations in the backward pass.
      policy = REMAT_POLICIES[self.remat_policy]
      res_block = nn.remat(ResBlock, static_argnums=(3,), policy=policy)  # `train` (self is 0).
      transformer = nn.remat(SpatialTransformer, policy=policy)
    res = lambda ch, name: res_block(ch, self.norm_groups, self.dropout, self.dtype, name=name)
    attn = lambda depth, name: transformer(depth, self.head_dim, self.norm_groups,
                                           self.use_linear_projection, self.dtype, name=name)
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
        b, hgt, wid, ch = h.shape
        h = jax.image.resize(h, (b, 2 * hgt, 2 * wid, ch), method="nearest")
        h = layers.conv(ch, dtype=self.dtype, name=f"up_{level}_upsample")(h)

    h = nn.silu(layers.group_norm(self.norm_groups, dtype=self.dtype, name="norm_out")(h))
    out = layers.conv(self.out_channels, zero_init=True, dtype=self.dtype, name="conv_out")(h)
    return out.astype(jnp.float32)
