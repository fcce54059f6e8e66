"""Unconditional digits (as DDPM): the default digits U-Net with no conditioning and no guidance.

    python -m diffusion_jax.sample --workdir=runs/digits_uncond --num_per_prompt=500
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.conditioning = "none"
  config.diffusion.p_uncond = 0.0  # Nothing to drop.
  config.sampling.guidance_scale = 1.0  # Nothing to guide.
  # The schedule and sampler its README results were measured with (the digits defaults until they changed).
  config.num_train_steps = 2000
  config.optimizer.learning_rate = 1e-3
  config.sampling.num_steps = 50
  return config
