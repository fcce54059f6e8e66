"""A tiny model and a short run: seconds per step on one CPU core. For smoke tests and CI, not results."""

from diffusion_jax.config import get_default_config


def get_config():
  c = get_default_config()
  c.num_train_steps = 20
  c.batch_size = 16
  c.log_every_steps = 10
  c.checkpoint_every_steps = 10
  c.sample_every_steps = 20
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
  # Constant after warm-up: the cosine schedule bakes num_train_steps into the compiled step, and tests
  # vary the run length, so each length compiled a step of its own instead of sharing one through the
  # persistent compilation cache. The cosine schedule is trained by the digits config (the main job).
  c.optimizer.schedule = "constant"
  c.sampling.num_steps = 5
  c.sampling.num_per_prompt = 1
  return c
