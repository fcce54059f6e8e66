"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021): the L_hybrid model with the cosine schedule.

`configs/ddpm_cifar10.py` changed where improved DDPM changes it:
- Learned reverse variances: the U-Net outputs 6 channels, ε and the v of eq. 15 (log Σ between log β̃_t
  and log β_t), trained with L_hybrid = L_simple + λ·L_vlb, λ = 0.001 (eq. 16, stop-gradient on the mean
  in L_vlb, §3.1); timesteps drawn uniformly (importance sampling is only for pure L_vlb, §3.3).
- Cosine schedule (eq. 17, s = 0.008, β ≤ 0.999) with T = 4000.
- U-Net: 128 channels × (1, 2, 2, 2), 3 ResBlocks per level, self-attention with 4 heads at 16×16 and
  8×8 (and in the middle), the timestep embedding as a scale and shift of the norm (AdaGN,
  `use_scale_shift_norm`), dropout 0.3; resampling by (strided) convolutions as in DDPM.
- Adam (AdamW without weight decay), learning rate 1e-4, constant, no warm-up and no gradient clipping;
  batch 128; EMA 0.9999; 500k steps (improved-diffusion itself trains until stopped); no random flips
  (improved-diffusion's data loader has none).
- Samples: ancestral sampling with the learned variance over all 4,000 steps (§4: with a learned Σ
  the chain can be respaced, e.g. --steps=100, with little loss in FID).

Sources: the paper (arXiv:2102.09672, §3–4; the architecture and training numbers below are
those of its code, not re-checked against its appendix) and its code, openai/improved-diffusion: the
README's CIFAR-10 flags `--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True
--dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine --lr 1e-4 --batch_size 128`, and the
defaults of `script_util.model_and_diffusion_defaults` (num_heads=4, attention_resolutions="16,8",
use_scale_shift_norm=True, rescale_learned_sigmas=True: the VLB term times T/1000, i.e. λ = 0.001) and
`create_model` (channel_mult (1, 2, 2, 2) at 32 pixels); `train_util` (AdamW, weight_decay 0, ema_rate
0.9999, no clipping, no warm-up; lr_anneal_steps 0: constant).

Not reproduced: improved-diffusion feeds the U-Net t·1000/T (`rescale_timesteps`) where this U-Net embeds
t itself, and its EMA has no warm-up (this trainer's does, for every config).

Read from your TFDS data dir (`tfds build cifar10 --data_dir=<dir> --file_format=array_record` on a
machine with internet, then --config.dataset.data_dir=<dir>); nothing is downloaded at run time.
"""

from configs import ddpm_cifar10


def get_config():
  config = ddpm_cifar10.get_config()
  config.dataset.random_flip = False  # improved-diffusion's ImageDataset does not flip.

  unet = config.model.unet
  unet.channels = 128
  unet.channel_mult = (1, 2, 2, 2)
  unet.num_res_blocks = 3
  unet.transformer_depth = (0, 1, 1, 0)  # Attention at 16×16 and 8×8 (attention_resolutions "16,8").
  unet.mid_transformer_depth = 1
  unet.attention_type = "self"
  unet.num_heads = 4
  unet.norm_groups = 32
  unet.scale_shift_norm = True
  unet.resblock_updown = False
  unet.dropout = 0.3

  config.diffusion.num_timesteps = 4000
  config.diffusion.beta_schedule = "cosine"
  config.diffusion.prediction_type = "eps"
  config.diffusion.loss_weighting = "uniform"
  config.diffusion.learn_sigma = True
  config.diffusion.vlb_weight = 0.001  # λ of L_hybrid.

  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = "constant"
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
  config.optimizer.weight_decay = 0.0
  # improved-diffusion does not clip gradients; the optimizer needs a positive norm, so one never reached.
  config.optimizer.grad_clip_norm = 1e9
  config.optimizer.ema_decay = 0.9999
  config.batch_size = 128
  config.num_train_steps = 500_000

  config.sampling.sampler = "ddpm"  # With the learned variance (the model outputs it; ddpm_variance unused).
  config.sampling.num_steps = 4000
  return config
