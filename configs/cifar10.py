"""Class-conditional CIFAR-10 (32×32×3, 10 classes) with classifier-free guidance, random flips.

A 42M-parameter U-Net (DDPM's CIFAR-10 layout with self-attention at 16×16) sized to train in about a
day on one accelerator (batch 128, 200k steps). Read from your TFDS data dir (`tfds build cifar10
--data_dir=<dir> --file_format=array_record` on a machine with internet, then
--config.dataset.data_dir=<dir>); nothing is downloaded at run time.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "cifar10"
  config.dataset.image_size = 32
  config.dataset.channels = 3
  config.dataset.random_flip = True
  config.model.conditioning = "class"
  config.model.class_embedding_width = 512
  config.model.dtype = "bfloat16"
  config.model.unet.channels = 128
  config.model.unet.channel_mult = (1, 2, 2, 2)
  config.model.unet.num_res_blocks = 2
  config.model.unet.transformer_depth = (0, 1, 0, 0)  # Self-attention at 16×16, as DDPM.
  config.model.unet.mid_transformer_depth = 1
  config.model.unet.head_dim = 64
  config.model.unet.norm_groups = 32
  config.model.unet.dropout = 0.1
  config.diffusion.beta_schedule = "cosine"
  config.diffusion.p_uncond = 0.1
  config.num_train_steps = 200_000
  config.batch_size = 128
  config.log_every_steps = 500
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 10_000
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 5000
  config.optimizer.ema_decay = 0.9999
  config.sampling.num_per_prompt = 8
  return config
