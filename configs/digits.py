"""Default experiment: text-to-image diffusion on scikit-learn's 8×8 handwritten digits (CPU, minutes)."""

from diffusion_jax.config import get_default_config


def get_config():
  config = get_default_config()
  config.num_train_steps = 4000
  config.batch_size = 128
  return config
