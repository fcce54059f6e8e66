"""Class-conditional digits: the default digits model with a label embedding instead of text.

The label (0..9) is embedded and added to the timestep embedding, as in the class-conditional models of
Ho & Salimans (2022); it is replaced by a null label with probability p_uncond = 0.1, so one model learns
conditional and unconditional prediction, and guidance works as for text:
    python -m diffusion_jax.sample --workdir=runs/digits_class --labels=0,1,2,3,4,5,6,7,8,9 --guidance_scale=3
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.conditioning = "class"
  # The schedule and sampler its README results were measured with (the digits defaults until they changed).
  config.num_train_steps = 2000
  config.optimizer.learning_rate = 1e-3
  config.sampling.num_steps = 50
  return config
