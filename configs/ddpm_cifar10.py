"""DDPM on CIFAR-10 (Ho, Jain & Abbeel 2020, §4 and appendix B): unconditional, FID 3.17, IS 9.46.

The paper's network and training, changed from the defaults only where the paper says:
- U-Net (PixelCNN++ backbone): 128 channels × (1, 2, 2, 2) at 32, 16, 8, 4 pixels, 2 ResBlocks per
  level, one-head self-attention at 16×16 (and in the middle), dropout 0.1, GroupNorm(32), no
  cross-attention: 35.7M parameters (35,746,307).
- T = 1000, β linear from 1e-4 to 0.02, ε-prediction with the unweighted loss (L_simple).
- Adam, learning rate 2e-4 after 5,000 warm-up steps, constant; gradients clipped at norm 1;
  batch 128; random horizontal flips; EMA 0.9999; 800k steps.
- Samples: ancestral sampling over all 1,000 steps with σ_t² = β_t (the paper's CIFAR-10 choice).

Read from your TFDS data dir (`tfds build cifar10 --data_dir=<dir> --file_format=array_record` on a
machine with internet, then --config.dataset.data_dir=<dir>); nothing is downloaded at run time.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "cifar10"
  config.dataset.image_size = 32
  config.dataset.channels = 3
  config.dataset.random_flip = True
  config.model.conditioning = "none"

  unet = config.model.unet
  unet.channels = 128
  unet.channel_mult = (1, 2, 2, 2)
  unet.num_res_blocks = 2
  unet.transformer_depth = (0, 1, 0, 0)  # Attention at 16×16 only.
  unet.mid_transformer_depth = 1
  unet.attention_type = "self"
  unet.num_heads = 1
  unet.norm_groups = 32
  unet.dropout = 0.1

  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_schedule = "linear"
  config.diffusion.prediction_type = "eps"
  config.diffusion.loss_weighting = "uniform"
  config.diffusion.p_uncond = 0.0  # Unconditional: nothing to drop.

  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 5000
  config.optimizer.schedule = "constant"
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.ema_decay = 0.9999
  config.batch_size = 128
  config.num_train_steps = 800_000

  config.sampling.sampler = "ddpm"
  config.sampling.num_steps = 1000
  config.sampling.ddpm_variance = "large"
  config.sampling.guidance_scale = 1.0  # Unconditional: no guidance.

  config.log_every_steps = 1000
  config.checkpoint_every_steps = 20_000
  config.sample_every_steps = 20_000
  config.eval_num_examples = 1024
  config.eval.feature_network = "inception"  # FID; periodic FID needs config.eval.inception_weights.
  return config
