"""Text-conditioned U-Net (DDPM / Stable Diffusion layout) and the model that pairs it with a text encoder.

Per resolution level: `num_res_blocks` ResBlocks, each followed by `transformer_depth[level]`
transformer blocks (self-attention, cross-attention to the text tokens, GEGLU feed-forward), then a
stride-2 downsample. The middle is ResBlock → transformer → ResBlock; the way up mirrors the way
down with skip connections (one more ResBlock per level) and nearest-neighbour upsampling.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models.text_encoder import TextEncoder


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
  """LN → self-attn, LN → cross-attn to `context`, LN → GEGLU feed-forward; each residual."""

  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
    width = x.shape[-1]
    attn = lambda name: layers.MultiHeadAttention(self.num_heads, self.head_dim, self.dtype, name=name)
    x = x + attn("self_attn")(layers.layer_norm(dtype=self.dtype, name="ln_self")(x))
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
  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
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

  __call__(x_t [B, H, W, C] in model units, t [B] timesteps, context [B, L, D], context_mask [B, L],
  pooled [B, D]) → [B, H, W, out_channels] float32.
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
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, context_mask: jax.Array,
               pooled: jax.Array, train: bool = False) -> jax.Array:
    temb_dim = 4 * self.channels
    temb = layers.sinusoidal_embedding(t, self.channels)
    temb = layers.dense(temb_dim, (None, "mlp"), dtype=self.dtype, name="time_mlp_1")(temb)
    temb = layers.dense(temb_dim, ("mlp", "embed"), dtype=self.dtype, name="time_mlp_2")(nn.silu(temb))
    temb = temb + layers.dense(temb_dim, ("mlp", "embed"), dtype=self.dtype, name="pooled_text_proj")(pooled)
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


class TextToImageModel(nn.Module):
  """The text encoder and U-Net trained jointly. Params: {'text_encoder': …, 'unet': …}."""

  text_encoder: TextEncoder
  unet: UNet
  image_shape: tuple[int, int, int]  # (H, W, C)

  def encode_text(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens [B, L] → (context [B, L, D], mask [B, L], pooled [B, D])."""
    return self.text_encoder(tokens)

  def denoise(self, x_t: jax.Array, t: jax.Array, context: jax.Array, context_mask: jax.Array,
              pooled: jax.Array, train: bool = False) -> jax.Array:
    """x_t [B, H, W, C], t [B] → prediction [B, H, W, C] (ε, v or x0, per the config)."""
    layers.check_shape("x_t", x_t, (None,) + tuple(self.image_shape))
    return self.unet(x_t, t, context, context_mask, pooled, train)

  def __call__(self, x_t: jax.Array, t: jax.Array, tokens: jax.Array, train: bool = False) -> jax.Array:
    return self.denoise(x_t, t, *self.encode_text(tokens), train=train)


def create_model(config) -> TextToImageModel:
  """Builds the model from `config.model`, `config.text` and `config.dataset`."""
  from diffusion_jax.models.tokenizer import VOCAB_SIZE  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(config.model.dtype)
  te, un = config.model.text_encoder, config.model.unet
  text_encoder = TextEncoder(VOCAB_SIZE, config.text.max_length, te.width, te.depth, te.num_heads,
                             te.mlp_ratio, dtype, name="text_encoder")
  unet = UNet(config.dataset.channels, un.channels, tuple(un.channel_mult), un.num_res_blocks,
              tuple(un.transformer_depth), un.mid_transformer_depth, un.head_dim, un.norm_groups,
              un.dropout, un.use_linear_projection, dtype, config.model.remat_policy, name="unet")
  size = config.dataset.image_size
  return TextToImageModel(text_encoder, unet, (size, size, config.dataset.channels))
