"""Classifier-free guidance on ImageNet 64×64 (Ho & Salimans 2022): class-conditional ADM, p_uncond 0.1.

Ho & Salimans §4: "the same model architectures and hyperparameters as the guided diffusion models of
Dhariwal & Nichol (2021)", 400k steps at 64×64, p_uncond ∈ {0.1, 0.2, 0.5} (0.1 and 0.2 best; 0.1
here), guidance w ∈ [0, 4] with ε̃ = (1 + w)·ε_c − w·ε_u, i.e. this project's guidance_scale s = 1 + w.
Best FID 1.55 at w = 0.1 (s = 1.1); unguided 1.80.

ADM's ImageNet-64 model (Dhariwal & Nichol 2021, Table 11 and the guided-diffusion README flags):
192 channels × (1, 2, 3, 4), 3 ResBlocks per level, self-attention with heads of 64 channels at 32, 16
and 8 pixels (and in the middle), AdaGN (scale-shift norm), BigGAN-style residual up/downsampling,
dropout 0.1, learned variances with L_hybrid (λ = 0.001), T = 1000 cosine, the label embedding added to
the timestep embedding (its width, no projection); Adam 3e-4, batch 2048, EMA 0.9999. 296M parameters
(295,905,222 here: ADM's 295,904,454 plus the null label's 768-wide row that guidance needs).

Not reproduced: Ho & Salimans train in continuous time (log-SNR λ ∈ [−20, 20], sampling variance
exponent v = 0.3); this trainer is discrete-time (T = 1000), as ADM itself. Their 64×64 FIDs do not state
the number of sampling steps; ADM's use 250, which `sampling.num_steps` takes here.

Read from your TFDS data dir (`tfds build imagenet_resized/64x64 --data_dir=<dir>
--file_format=array_record`, then --config.dataset.data_dir=<dir>); nothing is downloaded at run time.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "imagenet_resized/64x64"
  config.dataset.image_size = 64
  config.dataset.channels = 3
  config.dataset.random_flip = True  # guided-diffusion's loader flips at random.
  config.model.conditioning = "class"
  config.model.class_embedding_width = 4 * 192  # ADM's label embedding: the timestep embedding's width.

  unet = config.model.unet
  unet.channels = 192
  unet.channel_mult = (1, 2, 3, 4)
  unet.num_res_blocks = 3
  unet.transformer_depth = (0, 1, 1, 1)  # Attention at 32, 16 and 8 pixels (attention_resolutions 32,16,8).
  unet.mid_transformer_depth = 1
  unet.attention_type = "self"
  unet.num_heads = 0
  unet.head_dim = 64  # num_head_channels.
  unet.norm_groups = 32
  unet.scale_shift_norm = True
  unet.resblock_updown = True
  unet.pooled_projection = False  # The label embedding is added as is.
  unet.dropout = 0.1

  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_schedule = "cosine"
  config.diffusion.prediction_type = "eps"
  config.diffusion.loss_weighting = "uniform"
  config.diffusion.learn_sigma = True
  config.diffusion.vlb_weight = 0.001
  config.diffusion.p_uncond = 0.1

  config.optimizer.learning_rate = 3e-4
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = "constant"
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 1e9  # ADM does not clip gradients (the optimizer needs a positive norm).
  config.optimizer.ema_decay = 0.9999
  config.batch_size = 2048
  config.num_train_steps = 400_000  # Ho & Salimans' 64×64 models (ADM trained 540k).
  # A batch this size needs a pod. Where its step does not fit without remat: the least recompute that does,
  # and on a smaller slice, as many micro-batches as needed (the same batch and update; memory_fit.py).
  # A CPU or a roomy device compiles it once, as configured.
  config.model.remat_policy = "auto"
  config.auto_gradient_accumulation = True

  config.sampling.sampler = "ddpm"  # Ancestral, with the learned variance.
  config.sampling.num_steps = 250
  config.sampling.guidance_scale = 1.1  # w = 0.1: the best FID of Table 1.

  config.log_every_steps = 1000
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 10_000
  config.eval_num_examples = 1024
  config.eval.feature_network = "inception"
  config.eval.guidance_scales = (1.0, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 5.0)  # w = 0, 0.1, 0.2, 0.3, 0.5, 1, 2, 4.
  return config
