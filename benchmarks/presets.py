"""Benchmark presets: one U-Net layout each, from which both our config and the peer's
(diffusers' FlaxUNet2DConditionModel) constructor arguments are derived, so the two cannot drift apart.

  preset = presets.get("small")
  config = presets.our_config(preset)          # configs/sd21_unet.py with this layout, pixel space
  kwargs = presets.peer_unet_kwargs(preset)    # FlaxUNet2DConditionModel(**kwargs)

The layout is Stable Diffusion's: per level `num_res_blocks` ResBlocks, each followed by one transformer
(self-attention, cross-attention to the context, GEGLU feed-forward) where `attention[level]`, a middle
ResBlock → transformer → ResBlock, heads `head_dim` wide, linear proj_in/proj_out, GroupNorm(32).
Inputs are S×S×4 (SD's latent shape; both networks see them directly, no autoencoder), the context is
L tokens of width D.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from diffusion_jax.data import registry

# diffusers' GroupNorms have 32 groups, whatever the width.
PEER_NORM_GROUPS = 32
LATENT_CHANNELS = 4


@dataclasses.dataclass(frozen=True)
class Preset:
  """A U-Net layout and the shapes it is benchmarked at.

  block_channels: channels per level (multiples of 32, the first dividing the others).
  attention: per level, whether its ResBlocks are followed by a (cross-attention) transformer.
  image_size: S of the S×S×4 inputs; batch_size: B, the global training batch.
  context_length, context_width: the cross-attention context [B, L, D].
  dtype: compute dtype of both networks (parameters stay float32).
  """

  name: str
  block_channels: tuple[int, ...]
  attention: tuple[bool, ...]
  num_res_blocks: int
  head_dim: int
  image_size: int
  batch_size: int
  context_length: int
  context_width: int
  dtype: str = "float32"
  gpu_only: bool = False  # Too big to run on a CPU in minutes (it still lowers abstractly there).

  def __post_init__(self):
    base = self.block_channels[0]
    if len(self.attention) != len(self.block_channels):
      raise ValueError(f"{self.name}: attention={self.attention} needs one entry per level of {self.block_channels}")
    if any(c % PEER_NORM_GROUPS or c % base for c in self.block_channels):
      raise ValueError(f"{self.name}: block_channels={self.block_channels} must be multiples of "
                       f"{PEER_NORM_GROUPS} (the peer's GroupNorm groups) and of the first level's width")
    attended = [c for c, a in zip(self.block_channels, self.attention) if a] + [self.block_channels[-1]]
    if any(c % self.head_dim for c in attended):
      raise ValueError(f"{self.name}: head_dim={self.head_dim} must divide the widths with attention {attended}")
    if self.image_size % 2 ** (len(self.block_channels) - 1):
      raise ValueError(f"{self.name}: image_size={self.image_size} must be divisible by 2^(levels - 1)")

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """(S, S, 4): one example, channels last (ours); the peer takes [B, 4, S, S]."""
    return (self.image_size, self.image_size, LATENT_CHANNELS)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # Seconds to compile on one CPU core: the tests' preset.
    Preset("tiny", (32, 64), (True, False), num_res_blocks=1, head_dim=32, image_size=8, batch_size=2,
           context_length=8, context_width=32),
    # 2.2M U-Net parameters, 5.1 GFLOP forward at batch 16.
    Preset("small", (32, 64, 64), (True, True, False), num_res_blocks=2, head_dim=32, image_size=16,
           batch_size=16, context_length=8, context_width=64),
    # About a second per training step on a 2-core CPU: 24M U-Net parameters, 25 GFLOP forward at batch 8.
    # No attention at full resolution (SD-XL's layout): 32×32 self-attention would double the cost.
    Preset("medium", (32, 96, 192, 256), (False, True, True, False), num_res_blocks=2, head_dim=32,
           image_size=32, batch_size=8, context_length=16, context_width=128),
    # The Stable Diffusion 2.1 U-Net (865,910,724 parameters) at its 512² training shape.
    Preset("sd21", (320, 640, 1280, 1280), (True, True, True, False), num_res_blocks=2, head_dim=64,
           image_size=64, batch_size=16, context_length=77, context_width=1024, dtype="bfloat16", gpu_only=True),
)}


def get(name: str) -> Preset:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
  return PRESETS[name]


def stand_in_dataset(image_shape: tuple[int, int, int]) -> str:
  """Registers (once) a captioned dataset of `image_shape` with no data: the train step's cost depends
  only on the shapes, and the benchmark feeds it random batches. Returns its name."""
  size, _, channels = image_shape
  name = f"bench-stand-in-{size}x{size}x{channels}"
  if name not in registry.DATASETS:
    registry.DATASETS[name] = registry.DatasetSpec(
        name=name, image_shape=tuple(image_shape), class_names=("image",), caption_templates=("{class_name}",),
        has_captions=True, builder_cls=lambda: None, rebuildable=False, random_flip=False)
  return name


def our_config(preset: Preset, dtype: str | None = None, attention: str = "auto") -> ml_collections.ConfigDict:
  """configs/sd21_unet.py (its diffusion, optimizer and sampling recipe) with the preset's U-Net, in
  pixel space on S×S×4 inputs, and a one-layer text encoder of the context's width and length (our
  model trains its conditioner jointly; the peer's is frozen and precomputed, so ours pays for it)."""
  from configs import sd21_unet  # pylint: disable=g-import-not-at-top  (needs the repository root on sys.path)
  config = sd21_unet.get_config()
  config.dataset.name = stand_in_dataset(preset.input_shape)
  config.dataset.image_size, config.dataset.channels = preset.image_size, LATENT_CHANNELS
  config.model.autoencoder = "pixels"  # The inputs stand for latents; neither side runs a VAE.
  config.model.dtype = dtype or preset.dtype
  config.model.attention = attention
  config.model.remat_policy = "none"  # The comparison: no remat, the whole batch in one pass.
  config.auto_gradient_accumulation = False
  config.text.max_length = preset.context_length
  te = config.model.text_encoder
  te.width, te.depth, te.num_heads, te.mlp_ratio = preset.context_width, 1, max(preset.context_width // 64, 1), 4
  un = config.model.unet
  base = preset.block_channels[0]
  un.channels = base
  un.channel_mult = tuple(c // base for c in preset.block_channels)
  un.num_res_blocks = preset.num_res_blocks
  un.transformer_depth = tuple(int(a) for a in preset.attention)
  un.mid_transformer_depth = 1
  un.num_heads, un.head_dim = 0, preset.head_dim
  un.use_linear_projection = True
  un.norm_groups = PEER_NORM_GROUPS
  un.dropout = 0.0
  un.attention_type = "transformer"
  un.pooled_projection = False
  config.batch_size = preset.batch_size
  config.mesh.shape = (1, 1, 1)
  return config


def peer_unet_kwargs(preset: Preset, dtype: str | None = None) -> dict:
  """FlaxUNet2DConditionModel's arguments for the preset's layout."""
  down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in preset.attention)
  up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(preset.attention))
  return dict(
      sample_size=preset.image_size, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
      down_block_types=down, up_block_types=up, block_out_channels=tuple(preset.block_channels),
      layers_per_block=preset.num_res_blocks,
      # diffusers reads `attention_head_dim` as the number of heads (diffusers#2011), per level.
      attention_head_dim=tuple(max(c // preset.head_dim, 1) for c in preset.block_channels),
      cross_attention_dim=preset.context_width, use_linear_projection=True,
      dtype=jnp.dtype(dtype or preset.dtype))
