"""The Stable Diffusion 1.5 U-Net and training recipe (Rombach et al. 2022; CompVis v1 config, SD 1.5
model card), on 64×64×4 latents of 512×512 images: 859,520,964 U-Net parameters, the released count.

- Latents: the frozen kl-f8 AutoencoderKL (128 × (1, 2, 4, 4), 4 latent channels, scale 0.18215).
- U-Net: 320 channels × (1, 2, 4, 4), 2 ResBlocks per level, one SpatialTransformer after each ResBlock
  at 64, 32 and 16 latent pixels (attention_resolutions 4, 2, 1) and in the middle, 8 heads at every
  width, 1×1-conv proj_in/proj_out, cross-attention to 77 tokens of width 768 (CLIP ViT-L/14's), no
  pooled-text input, GroupNorm(32), no dropout.
- T = 1000, β "scaled linear" (√β linear from √0.00085 to √0.012), ε-prediction, unweighted loss;
  10% of captions dropped (classifier-free guidance).
- AdamW, learning rate 1e-4 after a 10,000-step linear warm-up, constant; batch 2048; 595k steps at
  512×512 for 1.5 (resumed from 1.2); EMA weights are released (decay 0.9999: ldm's default).
- Samples: 50 DDIM steps with "leading" spacing (the original DDIM sampler's), guidance scale 7.5.

What this config cannot do yet (see REPRODUCE.md): the text encoder here is this project's jointly
trained transformer at CLIP-L's width and length, not the frozen CLIP ViT-L/14; the autoencoder starts
from random weights (importing the released AutoencoderKL and CLIP weights is the roadmap's next
step); and no 512×512 text-image dataset is registered: set --config.dataset.name to one.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = ""  # Yours: a text-image dataset of 512×512×3 images (none is registered yet).
  config.dataset.image_size = 512
  config.dataset.channels = 3
  config.dataset.random_flip = False
  config.model.conditioning = "text"
  config.model.autoencoder = "kl"
  vae = config.model.vae
  vae.block_channels, vae.layers_per_block, vae.latent_channels, vae.norm_groups = (128, 256, 512, 512), 2, 4, 32
  vae.scale_factor = 0.18215

  config.text.max_length = 77
  te = config.model.text_encoder  # The width and depth of CLIP ViT-L/14's text transformer.
  te.width, te.depth, te.num_heads, te.mlp_ratio = 768, 12, 12, 4

  unet = config.model.unet
  unet.channels = 320
  unet.channel_mult = (1, 2, 4, 4)
  unet.num_res_blocks = 2
  unet.transformer_depth = (1, 1, 1, 0)
  unet.mid_transformer_depth = 1
  unet.attention_type = "transformer"
  unet.num_heads = 8
  unet.head_dim = 40  # Unused with num_heads (320 / 8); kept consistent.
  unet.use_linear_projection = False
  unet.pooled_projection = False
  unet.norm_groups = 32
  unet.dropout = 0.0

  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_schedule = "scaled_linear"
  config.diffusion.prediction_type = "eps"
  config.diffusion.loss_weighting = "uniform"
  config.diffusion.p_uncond = 0.1

  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 10_000
  config.optimizer.schedule = "constant"
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
  config.optimizer.weight_decay = 0.01  # torch.optim.AdamW's default, which ldm uses.
  config.optimizer.grad_clip_norm = 1e9  # ldm does not clip (the optimizer needs a positive norm).
  config.optimizer.ema_decay = 0.9999
  config.batch_size = 2048
  config.num_train_steps = 595_000
  config.model.dtype = "bfloat16"
  # A batch this size needs a pod. Where its step does not fit without remat: the least recompute that does,
  # and on a smaller slice, as many micro-batches as needed (the same batch and update; memory_fit.py).
  # A CPU or a roomy device compiles it once, as configured.
  config.model.remat_policy = "auto"
  config.auto_gradient_accumulation = True

  config.sampling.sampler = "ddim"
  config.sampling.num_steps = 50
  config.sampling.spacing = "leading"
  config.sampling.guidance_scale = 7.5

  config.log_every_steps = 100
  config.checkpoint_every_steps = 5000
  config.sample_every_steps = 5000
  config.eval.feature_network = "inception"
  return config
