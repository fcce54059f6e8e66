"""The defaults of every key (`diffusion_jax/config.py`), as a config file: a starting point for new ones."""

from diffusion_jax.config import get_default_config


def get_config():
  return get_default_config()
