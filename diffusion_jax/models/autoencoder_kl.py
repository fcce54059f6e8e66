"""Stable Diffusion's latent autoencoder (AutoencoderKL, "kl-f8", Rombach et al. 2022) as a Flax module.

images [B, H, W, 3] in [-1, 1] ─encoder→ (mean, log variance) of latents [B, H/f, W/f, latent_channels]
latents ─decoder→ images, with f = 2^(len(block_channels) − 1) (SD: 8, so 512×512×3 ↔ 64×64×4).

The released SD 1.x / 2.x autoencoder: block_channels (128, 256, 512, 512), 2 ResBlocks per level
(3 on the way up), GroupNorm(32, ε = 1e-6), one single-head self-attention block in each middle,
1×1 quant convs: 83,653,863 parameters. Submodules carry the names of diffusers' Flax AutoencoderKL
(`down_blocks_0/resnets_1/conv1`, `mid_block/attentions_0/query`, …) so that released weights map
onto it name by name. Downsampling pads (0, 1) before a stride-2 3×3 convolution, as the original.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers

_EPS = 1e-6  # GroupNorm ε of the released autoencoder.


class ResnetBlock(nn.Module):
  """GN → SiLU → conv, GN → SiLU → conv, + skip (a 1×1 conv where the width changes). No timestep."""

  out_channels: int
  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = lambda name: layers.group_norm(self.norm_groups, epsilon=_EPS, dtype=self.dtype, name=name)
    h = layers.conv(self.out_channels, dtype=self.dtype, name="conv1")(nn.silu(norm("norm1")(x)))
    h = layers.conv(self.out_channels, dtype=self.dtype, name="conv2")(nn.silu(norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, kernel_size=1, dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the H·W positions: GN → q, k, v → softmax(q kᵀ/√C) v → proj, + x."""

  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = layers.flatten_spatial(layers.group_norm(self.norm_groups, epsilon=_EPS, dtype=self.dtype,
                                                 name="group_norm")(x))
    q, k, v = (layers.dense(c, ("embed", "heads"), dtype=self.dtype, name=n)(y)[:, :, None, :]
               for n in ("query", "key", "value"))
    y = jax.nn.dot_product_attention(q, k, v)[:, :, 0, :]
    y = layers.dense(c, ("heads", "embed"), dtype=self.dtype, name="proj_attn")(y)
    return x + y.reshape(b, h, w, c)


class Resample(nn.Module):
  """'down': pad (0, 1), 3×3 conv with stride 2; 'up': nearest ×2, 3×3 conv."""

  direction: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if self.direction == "down":
      return layers.conv(c, strides=2, padding=(0, 1), dtype=self.dtype, name="conv")(x)
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
    return layers.conv(c, dtype=self.dtype, name="conv")(x)


class LevelBlock(nn.Module):
  """`num_resnets` ResnetBlocks at `width`, then a resampling ('down', 'up' or '' for none)."""

  width: int
  num_resnets: int
  resample: str
  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    for j in range(self.num_resnets):
      h = ResnetBlock(self.width, self.norm_groups, self.dtype, name=f"resnets_{j}")(h)
    if self.resample:
      name = "downsamplers_0" if self.resample == "down" else "upsamplers_0"
      h = Resample(self.resample, self.dtype, name=name)(h)
    return h


class MidBlock(nn.Module):
  """ResnetBlock → AttentionBlock → ResnetBlock at constant width."""

  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.norm_groups, self.dtype, name="resnets_0")(x)
    x = AttentionBlock(self.norm_groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.norm_groups, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  """images [B, H, W, C] → [B, H/f, W/f, 2·latent_channels] (mean and log variance, concatenated)."""

  block_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.conv(self.block_channels[0], dtype=self.dtype, name="conv_in")(x)
    last = len(self.block_channels) - 1
    for i, width in enumerate(self.block_channels):
      h = LevelBlock(width, self.layers_per_block, "down" if i != last else "", self.norm_groups, self.dtype,
                     name=f"down_blocks_{i}")(h)
    h = MidBlock(self.norm_groups, self.dtype, name="mid_block")(h)
    h = nn.silu(layers.group_norm(self.norm_groups, epsilon=_EPS, dtype=self.dtype, name="conv_norm_out")(h))
    return layers.conv(2 * self.latent_channels, dtype=self.dtype, name="conv_out")(h)


class Decoder(nn.Module):
  """latents [B, h, w, latent_channels] → images [B, h·f, w·f, out_channels] (unclipped)."""

  block_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    widths = tuple(reversed(self.block_channels))
    h = layers.conv(widths[0], dtype=self.dtype, name="conv_in")(z)
    h = MidBlock(self.norm_groups, self.dtype, name="mid_block")(h)
    for i, width in enumerate(widths):
      h = LevelBlock(width, self.layers_per_block + 1, "up" if i != len(widths) - 1 else "", self.norm_groups,
                     self.dtype, name=f"up_blocks_{i}")(h)
    h = nn.silu(layers.group_norm(self.norm_groups, epsilon=_EPS, dtype=self.dtype, name="conv_norm_out")(h))
    return layers.conv(self.out_channels, dtype=self.dtype, name="conv_out")(h)


class AutoencoderKL(nn.Module):
  """`encode`: images [B, H, W, C] in [-1, 1] → (mean, logvar) [B, H/f, W/f, latent_channels], logvar
  clipped to [−30, 20] as the original; `decode`: latents → images [B, H, W, C] (unclipped).
  `__call__` (initialization) runs both."""

  block_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  image_channels: int = 3
  norm_groups: int = 32
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = Encoder(self.block_channels, self.layers_per_block, self.latent_channels, self.norm_groups,
                           self.dtype)
    self.quant_conv = layers.conv(2 * self.latent_channels, kernel_size=1, dtype=self.dtype)
    self.post_quant_conv = layers.conv(self.latent_channels, kernel_size=1, dtype=self.dtype)
    self.decoder = Decoder(self.block_channels, self.layers_per_block, self.image_channels, self.norm_groups,
                           self.dtype)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_channels) - 1)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(latents)).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    mean, _ = self.encode(images)
    return self.decode(mean)
