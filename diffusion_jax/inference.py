"""Loading a trained model from a workdir for sampling and evaluation."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from diffusion_jax import config as config_lib
from diffusion_jax import train_state
from diffusion_jax.checkpoint import Checkpointer
from diffusion_jax.diffusion import schedules
from diffusion_jax.errors import UserError
from diffusion_jax.models.tokenizer import ByteTokenizer
from diffusion_jax.models.unet import TextToImageModel, create_model
from diffusion_jax.parallel import mesh as mesh_lib


@dataclasses.dataclass
class LoadedModel:
  config: Any
  model: TextToImageModel
  schedule: schedules.NoiseSchedule
  tokenizer: ByteTokenizer
  params: Any  # EMA parameters.
  step: int


def read_config(workdir: str):
  if not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir!r} does not exist; pass the --workdir of a training run")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{path!r} does not exist; is {workdir!r} the workdir of a training run?")
  with open(path, encoding="utf-8") as f:
    return config_lib.with_defaults(config_lib.from_json(f.read()))


def load_from_workdir(workdir: str, step: int | None = None) -> LoadedModel:
  """EMA parameters of `workdir`'s checkpoint at `step` (default: the latest), on all local devices."""
  config = read_config(workdir)
  checkpointer = Checkpointer(workdir, read_only=True)
  steps = checkpointer.all_steps()
  if not steps:
    raise UserError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')!r}; train first")
  step = max(steps) if step is None else step
  # Inference replicates parameters over a data-parallel mesh of whatever devices are here, so a
  # checkpoint trained on a different mesh loads as well.
  config.mesh.shape = (-1, 1, 1)
  mesh = mesh_lib.create_mesh(config.mesh.shape)
  model = create_model(config)
  tx = train_state.create_optimizer(config)
  abstract = train_state.abstract_train_state(model, tx, mesh, mesh_lib.logical_rules(config), True)
  state = checkpointer.restore(step, abstract)
  checkpointer.close()
  schedule = schedules.schedule_from_config(config)
  return LoadedModel(config, model, schedule, ByteTokenizer(config.text.max_length),
                     jax.device_get(state.ema_params), step)
