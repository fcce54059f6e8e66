"""Shared fixtures: a prepared digits dataset and a tiny config that trains in seconds."""

import os

import pytest

from diffusion_jax.config import get_default_config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The digits dataset prepared once per test session (or reused from $DIFFUSION_JAX_DATA_DIR)."""
  path = os.environ.get("DIFFUSION_JAX_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
  from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = get_default_config()
  config.dataset.data_dir = path
  pipeline.get_builder(config)
  return path


def tiny_config(data_dir: str = ""):
  """A small model and short schedule: a few seconds to compile and run on one CPU core."""
  c = get_default_config()
  c.dataset.data_dir = data_dir
  c.num_train_steps = 20
  c.batch_size = 16
  c.log_every_steps = 10
  c.checkpoint_every_steps = 10
  c.sample_every_steps = 20
  c.text.max_length = 32
  c.model.text_encoder.width = 32
  c.model.text_encoder.depth = 1
  c.model.text_encoder.num_heads = 2
  c.model.unet.channels = 16
  c.model.unet.channel_mult = (1, 2)
  c.model.unet.num_res_blocks = 1
  c.model.unet.transformer_depth = (0, 1)
  c.model.unet.head_dim = 16
  c.model.unet.norm_groups = 4
  c.diffusion.num_timesteps = 100
  c.optimizer.warmup_steps = 5
  c.sampling.num_steps = 5
  c.sampling.num_per_prompt = 1
  return c


@pytest.fixture
def config(data_dir):
  return tiny_config(data_dir)
