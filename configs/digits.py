"""Default experiment: text-to-image diffusion on scikit-learn's 8×8 handwritten digits.

Trains at the native 8×8 resolution (upsampling would add no information and cost 4× the compute):
a 1.1M-parameter U-Net (32/64 channels, attention at 4×4) and a 2-layer text encoder, 1,500 steps
of batch 64 (64 epochs) with min-SNR-5 loss weighting, about 5 minutes on a 2-core CPU.
"""

from diffusion_jax.config import get_default_config


def get_config():
  config = get_default_config()
  config.dataset.name = "digits"
  # Min-SNR-γ weighting (Hang et al. 2023, γ = 5) converges faster than the uniform ε loss: at 1,500 steps
  # it reached unguided prompt accuracy 0.959 (uniform: 0.938 at 2,000 steps, 0.930 at 1,600) and guided
  # 1.0, with higher precision and IS but lower recall at guidance 1 (FD 0.68 vs 0.48; 1,000 samples).
  config.num_train_steps = 1500
  config.diffusion.loss_weighting = "min_snr"
  config.batch_size = 64
  config.model.unet.channels = 32
  config.model.unet.channel_mult = (1, 2)
  config.model.unet.num_res_blocks = 1
  config.model.unet.transformer_depth = (0, 1)
  config.diffusion.beta_schedule = "cosine"
  config.diffusion.p_uncond = 0.1
  # DDIM with 25 steps for the grids, `sample` and `evaluate`: on this model, 50 steps against 25 gave the
  # same prompt accuracy (unguided 0.938 vs 0.939, guided 1.0 vs 1.0; 1,000 samples each) and FD 0.445 vs
  # 0.484 at guidance 1, at twice the cost.
  config.sampling.num_steps = 25
  # No sample evaluation during training: `python -m diffusion_jax.evaluate` measures the final
  # checkpoint (1,000 samples at guidance 1 and 3), and evaluating 500 samples at each checkpoint
  # as well cost a minute of the README's 10. Training still writes sample grids and the held-out loss
  # at each checkpoint; --config.eval.every_steps=750 adds FD / KID / precision-recall / accuracy of
  # eval.num_samples samples at guidance 3 in the digits feature network.
  config.eval.num_samples = 500
  # A checkpoint (with the held-out loss) and a sample grid every 750 steps: about every 2.5 minutes here.
  config.checkpoint_every_steps = 750
  config.sample_every_steps = 750
  return config
