"""One place that turns a config into the pieces of a run.

    run = build.build(config)     # run.mesh, run.rules, run.model, run.optimizer, run.schedule,
                                  # run.conditioning, run.autoencoder, run.dataset

Train, inference (sample, evaluate, export), the benchmarks and the tests all start here, so a piece is
assembled the same way everywhere. Nothing here touches data files, TFDS or grain: the dataset spec is
metadata, and the input pipeline is built by the training job.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from diffusion_jax import config as config_lib
from diffusion_jax import train_state
from diffusion_jax.data import registry
from diffusion_jax.diffusion import schedules
from diffusion_jax.models import attention as attention_lib
from diffusion_jax.models import autoencoder as autoencoder_lib
from diffusion_jax.models import conditioning as conditioning_lib
from diffusion_jax.models.conditioning import ClassEmbedding
from diffusion_jax.models.diffusion_model import DiffusionModel
from diffusion_jax.models.text_encoder import TextEncoder
from diffusion_jax.models.unet import UNet
from diffusion_jax.parallel import mesh as mesh_lib
from diffusion_jax.text.tokenizer import VOCAB_SIZE, ByteTokenizer


@dataclasses.dataclass(frozen=True)
class Run:
  """The pieces of a run; `config` is the validated config they were built from (never modified)."""

  config: Any
  dataset: registry.DatasetSpec
  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]
  model: DiffusionModel
  optimizer: optax.GradientTransformation
  schedule: schedules.NoiseSchedule
  conditioning: Any  # conditioning.TextConditioning | ClassConditioning | NoConditioning
  autoencoder: autoencoder_lib.PixelSpace | autoencoder_lib.LatentSpace

  @functools.cached_property
  def state_shapes(self) -> train_state.StateShapes:
    """The train state's boxed shapes and pooled-draw counts: the model's init traced once per Run, shared
    by abstract_state (a training job's restore target and compile) and create_state."""
    return train_state.state_shapes(self.model, self.optimizer)

  def create_state(self, rng: Any, seconds: dict[str, float] | None = None) -> tuple[Any, Any]:
    """(a fresh TrainState initialized directly in its sharded layout on this run's mesh, its shardings);
    `seconds`: see train_state.create_train_state."""
    return train_state.create_train_state(rng, self.model, self.optimizer, self.mesh, self.rules,
                                          self.config.mesh.replicate_indivisible, seconds=seconds,
                                          shapes=lambda: self.state_shapes)

  def abstract_state(self, replicate_indivisible: bool | None = None) -> Any:
    """The train state's ShapeDtypeStructs with shardings on this run's mesh (for restoring)."""
    replicate = self.config.mesh.replicate_indivisible if replicate_indivisible is None else replicate_indivisible
    return train_state.abstract_train_state(self.model, self.optimizer, self.mesh, self.rules, replicate,
                                            shapes=self.state_shapes)


def create_conditioning(config, dataset: registry.DatasetSpec):
  kind = config.model.conditioning
  if kind == "text":
    return conditioning_lib.TextConditioning(ByteTokenizer(config.text.max_length))
  if kind == "class":
    return conditioning_lib.ClassConditioning(dataset.num_classes)
  return conditioning_lib.NoConditioning()


def create_model(config, dataset: registry.DatasetSpec | None = None,
                 autoencoder: autoencoder_lib.PixelSpace | autoencoder_lib.LatentSpace | None = None
                 ) -> DiffusionModel:
  """The network from `config.model` (+ `config.text` for text, the dataset's classes for class models)."""
  dataset = dataset or registry.get(config.dataset.name)
  autoencoder = autoencoder or autoencoder_lib.create(config)
  dtype = jnp.dtype(config.model.dtype)
  latent_shape = autoencoder.latent_shape((config.dataset.image_size, config.dataset.image_size,
                                           config.dataset.channels))
  un = config.model.unet
  # A learned-variance model (improved DDPM) outputs the prediction's C channels and C variance values.
  out_channels = latent_shape[-1] * (2 if config.diffusion.learn_sigma else 1)
  attention = config.model.attention
  attention_lib.check_available(attention)
  # 'auto': training compiles the policies until one fits (memory_fit.py); inference has no backward pass.
  remat_policy = "none" if config.model.remat_policy == "auto" else config.model.remat_policy
  unet = UNet(out_channels, un.channels, tuple(un.channel_mult), un.num_res_blocks,
              tuple(un.transformer_depth), un.mid_transformer_depth, un.head_dim, un.norm_groups,
              un.dropout, un.use_linear_projection, dtype, remat_policy,
              attention_type=un.attention_type, num_heads=un.num_heads, scale_shift_norm=un.scale_shift_norm,
              resblock_updown=un.resblock_updown, pooled_projection=un.pooled_projection, attention=attention,
              name="unet")
  text_encoder = class_embedding = None
  if config.model.conditioning == "text":
    te = config.model.text_encoder
    text_encoder = TextEncoder(VOCAB_SIZE, config.text.max_length, te.width, te.depth, te.num_heads,
                               te.mlp_ratio, dtype, attention, name="text_encoder")
  elif config.model.conditioning == "class":
    class_embedding = ClassEmbedding(dataset.num_classes, config.model.class_embedding_width, name="class_embedding")
  # A latent autoencoder's weights ride in the train state as a frozen subtree (never trained).
  frozen = ("autoencoder",) if autoencoder.module is not None else ()
  return DiffusionModel(unet, tuple(latent_shape), text_encoder, class_embedding, frozen_subtrees=frozen,
                        autoencoder=autoencoder.module)


def build(config, *, mesh_shape: Sequence[int] | None = None, devices: Sequence[Any] | None = None) -> Run:
  """Validates `config` and builds every piece. `mesh_shape`/`devices` override the config's mesh
  (inference uses a data-parallel mesh of the local devices, whatever the training mesh was)."""
  config_lib.validate(config)
  dataset = registry.get(config.dataset.name)
  autoencoder = autoencoder_lib.create(config)
  model = create_model(config, dataset, autoencoder)
  mesh = mesh_lib.create_mesh(config.mesh.shape if mesh_shape is None else mesh_shape, devices)
  return Run(config=config, dataset=dataset, mesh=mesh, rules=mesh_lib.logical_rules(config), model=model,
             optimizer=train_state.create_optimizer(config, frozen=model.frozen_subtrees),
             schedule=schedules.schedule_from_config(config),
             conditioning=create_conditioning(config, dataset), autoencoder=autoencoder)
