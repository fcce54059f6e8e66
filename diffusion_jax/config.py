"""The complete config schema with defaults, and its validation.

Every key the code reads exists here, so `configs/<experiment>.py` files are small diffs of
`get_default_config()` and a typo in a key is an error, not a silently ignored setting.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections

from diffusion_jax.errors import UserError

# Flax logical axis name → mesh axis (or axes, or None = replicated). Parameters are sharded
# over `fsdp` on their largest "embed"-like dimension and over `tensor` on heads / channels.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", None),
    ("length", None),
)

MESH_AXES = ("data", "fsdp", "tensor")


def get_default_config() -> ml_collections.ConfigDict:
  """All keys with their defaults; experiment configs override a handful."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Training loop (these top-level names are a contract: scripts set them).
  c.num_train_steps = 2000
  c.batch_size = 64  # Global batch, over all processes and devices.
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  c.sample_every_steps = 500
  c.max_checkpoints_to_keep = 3  # The latest ones.
  c.keep_best_checkpoints = 0  # Also keep this many with the lowest eval_loss (0 = off).
  # eval_loss (logged at every checkpoint; ranks checkpoints): the loss on this many test examples
  # with fixed timesteps and noise, using the EMA parameters.
  c.eval_num_examples = 256
  c.gradient_accumulation_steps = 1  # Micro-batches per step (same update as one big batch).
  # Where the train step does not fit the devices' memory with gradient_accumulation_steps micro-batches,
  # split the batch into more (the fewest that fit: same global batch and update; memory_fit.py).
  c.auto_gradient_accumulation = False
  # A step whose loss or gradient is not finite is skipped; this many in a row stop the run.
  c.max_consecutive_nonfinite_steps = 10

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "digits"
  # "" = $DIFFUSION_JAX_DATA_DIR, else the dataset's default: ~/.cache/diffusion_jax/tensorflow_datasets for
  # the project's own datasets (built locally), $TFDS_DATA_DIR or ~/tensorflow_datasets for standard ones.
  c.dataset.data_dir = ""
  c.dataset.image_size = 8
  c.dataset.channels = 1
  c.dataset.num_threads = 2  # grain read threads per process.
  # Decode every example of a split once, at start, and serve them from memory: for datasets small
  # enough to hold decoded on every process (digits: 1,500 × 8×8), where reading and decoding a batch
  # would otherwise take CPU time from the step. The stream of batches is the same either way.
  c.dataset.cache_in_memory = False
  # Random horizontal flips of training images: True/False, or None for the dataset's default (cifar10
  # flips, digits do not: a mirrored digit is not a digit).
  c.dataset.random_flip = ml_collections.config_dict.placeholder(bool)

  c.text = ml_collections.ConfigDict()
  c.text.max_length = 32  # Tokens per prompt, BOS and EOS included.

  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"  # Compute dtype ("bfloat16" for mixed precision); parameters stay float32.
  # Activation checkpointing of U-Net blocks: none, dots, dots_no_batch, full, or auto (the first of those
  # whose train step fits the devices' memory; memory_fit.py).
  c.model.remat_policy = "none"
  # The attention kernel (models/attention.py): "auto" (cuDNN flash attention on GPU for bf16/fp16, Pallas
  # splash attention on TPU, else XLA), "xla", "cudnn" or "splash".
  c.model.attention = "auto"
  # What the model is conditioned on: "text" (prompts, jointly trained text encoder), "class" (labels of
  # the dataset's classes, with a null label for guidance) or "none" (unconditional).
  c.model.conditioning = "text"
  # Class models: width of the label embedding (4·unet.channels when unet.pooled_projection is False:
  # the embedding is then added to the timestep embedding as is, as in ADM).
  c.model.class_embedding_width = 128
  # The space the diffusion runs in: "pixels" (identity) or "kl" (Stable Diffusion's AutoencoderKL latents,
  # frozen; model.vae below).
  c.model.autoencoder = "pixels"
  c.model.vae = ml_collections.ConfigDict()  # AutoencoderKL; the defaults are SD 1.x / 2.x's "kl-f8".
  c.model.vae.block_channels = (128, 256, 512, 512)  # Per level; downsampling factor 2^(levels - 1).
  c.model.vae.layers_per_block = 2
  c.model.vae.latent_channels = 4
  c.model.vae.norm_groups = 32
  c.model.vae.scale_factor = 0.18215  # Latents are multiplied by this (about unit variance for SD's VAE).
  c.model.text_encoder = ml_collections.ConfigDict()
  c.model.text_encoder.width = 64
  c.model.text_encoder.depth = 2
  c.model.text_encoder.num_heads = 4
  c.model.text_encoder.mlp_ratio = 4
  c.model.unet = ml_collections.ConfigDict()
  c.model.unet.channels = 32
  c.model.unet.channel_mult = (1, 2)  # Channels per resolution level, as multiples of `channels`.
  c.model.unet.num_res_blocks = 1  # Per level, on the way down (one more on the way up).
  c.model.unet.transformer_depth = (0, 1)  # Transformer blocks after each ResBlock, per level; 0 = none.
  c.model.unet.mid_transformer_depth = 1
  c.model.unet.head_dim = 32  # Attention head width; heads = channels // head_dim.
  c.model.unet.norm_groups = 8
  c.model.unet.dropout = 0.0
  c.model.unet.use_linear_projection = True  # Linear (SD 2.x) vs 1×1 conv (SD 1.x) proj_in/proj_out.
  c.model.unet.attention_type = "transformer"  # SD's "transformer" (+ cross-attention) or DDPM/ADM's "self".
  c.model.unet.num_heads = 0  # > 0: this many heads at every width (DDPM 1, SD 1.x 8); 0: width head_dim.
  c.model.unet.scale_shift_norm = False  # ADM's AdaGN: the timestep embedding scales and shifts the norm.
  c.model.unet.resblock_updown = False  # ADM / BigGAN: resample inside ResBlocks, not by (strided) convs.
  # A linear map of the pooled condition (text or class) added to the timestep embedding. False: class
  # embeddings are added as is (ADM), pooled text is not used (SD has cross-attention only).
  c.model.unet.pooled_projection = True

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_timesteps = 1000
  c.diffusion.beta_schedule = "cosine"
  c.diffusion.prediction_type = "eps"
  c.diffusion.zero_terminal_snr = False  # Lin et al. 2023 rescale; needs prediction_type v or x0.
  c.diffusion.loss_weighting = "uniform"  # "uniform" or "min_snr" (Hang et al. 2023).
  c.diffusion.min_snr_gamma = 5.0
  c.diffusion.p_uncond = 0.1  # Probability of replacing a caption by the empty prompt.
  # Improved DDPM (Nichol & Dhariwal 2021): the U-Net also outputs the reverse variance (2·C channels,
  # log Σ between log β̃_t and log β_t, eq. 15), trained by L_hybrid = L_simple + λ·L_vlb (eq. 16) with
  # λ = vlb_weight; DDPM sampling and the NLL then use the learned variance.
  c.diffusion.learn_sigma = False
  c.diffusion.vlb_weight = 0.001  # λ (the paper's 0.001); only used with learn_sigma.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 200
  c.optimizer.schedule = "cosine"  # After warmup: "cosine" decay to 0 or "constant".
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.ema_decay = 0.999

  c.sampling = ml_collections.ConfigDict()
  c.sampling.sampler = "ddim"  # "ddim", "ddpm" or "dpm_solver_pp_2m".
  c.sampling.num_steps = 50
  c.sampling.spacing = "linspace"  # "linspace", "leading" or "trailing".
  c.sampling.eta = 0.0  # DDIM η.
  c.sampling.ddpm_variance = "small"  # DDPM posterior variance: "small" (β̃) or "large" (β).
  c.sampling.x0_clipping = "static"  # "static" ([-1, 1]), "dynamic" (Imagen) or "none".
  c.sampling.dynamic_threshold_percentile = 0.995
  c.sampling.guidance_scale = 3.0  # s: ε_u + s·(ε_c − ε_u); 1 = no guidance.
  c.sampling.guidance_rescale = 0.0  # φ of Lin et al. 2023.
  c.sampling.guidance_interval = (0.0, 1.0)  # Guidance only for t/T in [lo, hi].
  c.sampling.negative_prompt = ""  # Prompt of the unconditional branch.
  c.sampling.num_per_prompt = 8  # Images per prompt in the periodic training grid.
  c.sampling.prompts = ""  # Text models: ";"-separated prompts; "" = the dataset's canonical prompts.
  c.sampling.labels = ""  # Class models: ","-separated labels; "" = the dataset's canonical labels.

  # Sample quality during training (FD/FID, KID, precision/recall, IS, accuracy; see metrics/sample_eval.py):
  # every `every_steps` steps, `num_samples` samples per guidance scale with the sampler above, compared
  # with the real training split in the dataset's feature network. The full evaluation is `evaluate`.
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0  # 0 = off.
  c.eval.num_samples = 500
  c.eval.batch_size = 250  # Global sampling batch.
  c.eval.guidance_scales = ()  # () = (sampling.guidance_scale,).
  c.eval.feature_network = ""  # "" = the dataset's ("digits" for digits, else "inception").
  c.eval.inception_weights = ""  # The FID Inception weights file (see README: nothing is downloaded).
  c.eval.cache_dir = ""  # "" = $DIFFUSION_JAX_CACHE_DIR, else ~/.cache/diffusion_jax.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # Sizes of (data, fsdp, tensor); one -1 = "all remaining devices".
  c.mesh.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES
  # A parameter dimension that its mesh axes do not divide is an error, or, if True, replicated.
  c.mesh.replicate_indivisible = False
  return c


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def allowed_values() -> dict[str, tuple[str, ...]]:
  """The allowed values of each choice option, read from the module that implements it."""
  # pylint: disable=g-import-not-at-top  (those modules import JAX; the config schema does not need to)
  from diffusion_jax import memory_fit, train_state
  from diffusion_jax.data import registry
  from diffusion_jax.diffusion import losses, samplers, schedules
  from diffusion_jax.metrics import features
  from diffusion_jax.models import attention, autoencoder, conditioning, unet
  return {
      "dataset.name": tuple(registry.names()),
      "model.dtype": COMPUTE_DTYPES,
      "model.remat_policy": ("none",) + tuple(unet.REMAT_POLICIES) + (memory_fit.AUTO,),
      "model.attention": attention.IMPLEMENTATIONS,
      "model.conditioning": conditioning.KINDS,
      "model.unet.attention_type": tuple(unet.ATTENTION_TYPES),
      "model.autoencoder": autoencoder.KINDS,
      "diffusion.beta_schedule": tuple(schedules.BETA_SCHEDULES),
      "diffusion.loss_weighting": losses.LOSS_WEIGHTINGS,
      "diffusion.prediction_type": losses.PREDICTION_TYPES,
      "optimizer.schedule": train_state.LEARNING_RATE_SCHEDULES,
      "sampling.sampler": samplers.SAMPLERS,
      "sampling.spacing": samplers.SPACINGS,
      "sampling.ddpm_variance": samplers.DDPM_VARIANCES,
      "sampling.x0_clipping": samplers.X0_CLIPPINGS,
      "eval.feature_network": ("",) + features.NETWORKS,
  }


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def _check_finite(given: dict[str, Any]) -> None:
  """Every float in the config must be a number: NaN or ±inf in any option would train or sample
  garbage silently (NaN compares false with every bound, so range checks alone would let it through)."""
  for key, value in sorted(given.items()):
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, float) and not math.isfinite(v):
        raise UserError(f"config.{key}={value!r} must be a finite number")


def _check_range(key: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False) -> None:
  low_ok = lo is None or (value > lo if lo_open else value >= lo)
  high_ok = hi is None or (value < hi if hi_open else value <= hi)
  if not (low_ok and high_ok):
    left = "-inf" if lo is None else f"{lo:g}"
    right = "inf" if hi is None else f"{hi:g}"
    interval = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
    raise UserError(f"config.{key}={value!r} must be in {interval}")


# Numeric options and their allowed ranges (lo, hi, lo_open, hi_open); None = unbounded.
NUMERIC_RANGES = {
    "optimizer.learning_rate": (0.0, None, True, False),
    "optimizer.warmup_steps": (0, None, False, False),
    "optimizer.b1": (0.0, 1.0, False, True),
    "optimizer.b2": (0.0, 1.0, False, True),
    "optimizer.weight_decay": (0.0, None, False, False),
    "optimizer.grad_clip_norm": (0.0, None, True, False),
    "optimizer.ema_decay": (0.0, 1.0, False, False),
    "diffusion.p_uncond": (0.0, 1.0, False, False),
    "diffusion.min_snr_gamma": (0.0, None, True, False),
    "diffusion.vlb_weight": (0.0, None, False, False),
    "model.unet.dropout": (0.0, 1.0, False, True),
    "sampling.eta": (0.0, 1.0, False, False),
    "sampling.guidance_rescale": (0.0, 1.0, False, False),
    "sampling.dynamic_threshold_percentile": (0.0, 1.0, True, False),
    "keep_best_checkpoints": (0, None, False, False),
    "eval.every_steps": (0, None, False, False),
    "seed": (0, None, False, False),
}

POSITIVE_INTEGERS = (
    "num_train_steps", "batch_size", "log_every_steps", "checkpoint_every_steps", "sample_every_steps",
    "gradient_accumulation_steps", "max_consecutive_nonfinite_steps", "max_checkpoints_to_keep",
    "eval_num_examples", "text.max_length", "diffusion.num_timesteps", "sampling.num_steps",
    "sampling.num_per_prompt", "dataset.image_size", "dataset.channels", "dataset.num_threads",
    "model.text_encoder.width", "model.text_encoder.depth", "model.text_encoder.num_heads",
    "model.text_encoder.mlp_ratio", "model.class_embedding_width", "model.unet.channels",
    "model.unet.num_res_blocks",
    "model.unet.head_dim", "model.unet.norm_groups", "eval.num_samples", "eval.batch_size")

BOOLEANS = ("diffusion.learn_sigma", "auto_gradient_accumulation")


def _check_model_shapes(config: ml_collections.ConfigDict) -> None:
  """Channel counts that the layers would reject only at initialization, with a long traceback."""
  unet, te = config.model.unet, config.model.text_encoder
  if len(unet.transformer_depth) != len(unet.channel_mult):
    raise UserError(f"config.model.unet.transformer_depth={tuple(unet.transformer_depth)} needs one "
                    f"entry per level of channel_mult={tuple(unet.channel_mult)}")
  if any(m < 1 for m in unet.channel_mult) or any(d < 0 for d in unet.transformer_depth) or \
      unet.mid_transformer_depth < 0:
    raise UserError(f"config.model.unet.channel_mult={tuple(unet.channel_mult)} must be >= 1 and "
                    f"transformer_depth={tuple(unet.transformer_depth)}, mid_transformer_depth="
                    f"{unet.mid_transformer_depth} >= 0")
  levels = len(unet.channel_mult)
  factor = 2 ** (levels - 1)
  if config.model.autoencoder == "kl":  # The U-Net sees latents of image_size / the VAE's factor.
    factor *= 2 ** (len(config.model.vae.block_channels) - 1)
  if config.dataset.image_size % factor:
    raise UserError(f"config.dataset.image_size={config.dataset.image_size} must be divisible by {factor} "
                    f"(2**(levels-1) for channel_mult={tuple(unet.channel_mult)}, times the autoencoder's "
                    f"downsampling factor if any)")
  widths = [unet.channels * m for m in unet.channel_mult]
  if unet.num_heads < 0:
    raise UserError(f"config.model.unet.num_heads={unet.num_heads} must be >= 0 (0: heads of width head_dim)")
  heads_key, heads = ("num_heads", unet.num_heads) if unet.num_heads else ("head_dim", unet.head_dim)
  for level, (width, depth) in enumerate(zip(widths, unet.transformer_depth)):
    if width % unet.norm_groups:
      raise UserError(f"config.model.unet.norm_groups={unet.norm_groups} does not divide the {width} channels "
                      f"of level {level} (channels={unet.channels} × channel_mult[{level}]={unet.channel_mult[level]})")
    if depth and width % heads:
      raise UserError(f"config.model.unet.{heads_key}={heads} does not divide the {width} channels of "
                      f"level {level}, which has attention (transformer_depth[{level}]={depth})")
  if unet.mid_transformer_depth and widths[-1] % heads:
    raise UserError(f"config.model.unet.{heads_key}={heads} does not divide the {widths[-1]} channels "
                    f"of the middle block (mid_transformer_depth={unet.mid_transformer_depth})")
  if unet.attention_type == "self" and config.model.conditioning == "text":
    raise UserError("config.model.unet.attention_type='self' has no cross-attention, so a text model could not "
                    "read its prompt; use 'transformer'")
  if te.width % te.num_heads:
    raise UserError(f"config.model.text_encoder.num_heads={te.num_heads} does not divide "
                    f"width={te.width}")
  if config.model.autoencoder == "kl":
    vae = config.model.vae
    factor = 2 ** (len(vae.block_channels) - 1)
    if config.dataset.image_size % factor:
      raise UserError(f"config.dataset.image_size={config.dataset.image_size} must be divisible by the "
                      f"autoencoder's downsampling factor {factor} (model.vae.block_channels="
                      f"{tuple(vae.block_channels)})")
    bad = [w for w in vae.block_channels if w % vae.norm_groups]
    if bad or vae.latent_channels < 1 or not vae.scale_factor > 0:
      raise UserError(f"config.model.vae: norm_groups={vae.norm_groups} must divide every block_channels "
                      f"{tuple(vae.block_channels)}, latent_channels={vae.latent_channels} must be >= 1 and "
                      f"scale_factor={vae.scale_factor} > 0")
  temb_width = 4 * unet.channels
  if config.model.conditioning == "class" and not unet.pooled_projection and \
      config.model.class_embedding_width != temb_width:
    raise UserError(f"config.model.class_embedding_width={config.model.class_embedding_width} must be the "
                    f"timestep embedding's width 4·unet.channels={temb_width} when unet.pooled_projection=False "
                    f"(the label embedding is then added without a projection, as in ADM)")


def _check_sampling(config: ml_collections.ConfigDict) -> None:
  """The sampler settings and prompts of the periodic sample grid, so a run cannot die at its end."""
  from diffusion_jax import generation  # pylint: disable=g-import-not-at-top  (imports the model)
  from diffusion_jax.text.tokenizer import ByteTokenizer  # pylint: disable=g-import-not-at-top
  try:
    generation.sampler_options(config).validate(config.diffusion.num_timesteps)
  except UserError as exc:
    raise UserError(f"config.sampling: {exc}") from exc
  kind = config.model.conditioning
  if kind != "text" and (config.sampling.prompts or config.sampling.negative_prompt):
    raise UserError(f"config.sampling.prompts / negative_prompt need model.conditioning='text'; this model's "
                    f"is {kind!r} (class models take sampling.labels)")
  if kind != "class" and config.sampling.labels:
    raise UserError(f"config.sampling.labels needs model.conditioning='class'; this model's is {kind!r}")
  if kind == "class":
    generation.parse_labels(config.sampling.labels)
  tokenizer = ByteTokenizer(config.text.max_length)
  for prompt in generation.parse_prompts(config.sampling.prompts) + [config.sampling.negative_prompt]:
    try:
      tokenizer.encode(prompt)
    except UserError as exc:
      raise UserError(f"config.sampling: {exc}") from exc


def _check_dataset(config: ml_collections.ConfigDict) -> None:
  """The config's image shape is the dataset's, and the dataset offers what the model is conditioned on."""
  from diffusion_jax.data import registry  # pylint: disable=g-import-not-at-top
  spec = registry.get(config.dataset.name)
  shape = (config.dataset.image_size, config.dataset.image_size, config.dataset.channels)
  if shape != tuple(spec.image_shape):
    raise UserError(f"config.dataset.image_size={config.dataset.image_size}, channels={config.dataset.channels} "
                    f"give images of shape {shape}; dataset {spec.name!r} has {tuple(spec.image_shape)}")
  if config.model.conditioning == "class" and spec.num_classes < 1:
    raise UserError(f"model.conditioning='class' needs a dataset with class labels; {spec.name!r} has none")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first unknown key or bad value.

  Everything a later stage of a run would trip over (the final sample grid, a layer's shapes) is
  checked here, before any training, so that a run never fails after hours of work on its config.
  """
  known = flatten(get_default_config())
  given = flatten(config)
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise UserError(f"unknown config key(s) {unknown}; known keys are: {', '.join(sorted(known))}")
  if not given["dataset.name"]:  # Left empty by configs whose data is the user's choice (sd15_unet).
    size, channels = given["dataset.image_size"], given["dataset.channels"]
    raise UserError(f"config.dataset.name is empty: this config needs a dataset of {size}×{size}×{channels} "
                    f"images; set --config.dataset.name to one of {list(allowed_values()['dataset.name'])} "
                    f"with that shape, or register yours in diffusion_jax/data/registry.py")
  for key, allowed in allowed_values().items():
    if given[key] not in allowed:
      raise UserError(f"config.{key}={given[key]!r} is not allowed; choose one of {list(allowed)}")
  _check_finite(given)
  for key in POSITIVE_INTEGERS:
    if isinstance(given[key], bool) or not isinstance(given[key], int) or given[key] <= 0:
      raise UserError(f"config.{key}={given[key]!r} must be a positive integer")
  for key, (lo, hi, lo_open, hi_open) in NUMERIC_RANGES.items():
    _check_range(key, given[key], lo, hi, lo_open=lo_open, hi_open=hi_open)
  for key in BOOLEANS:
    if not isinstance(given[key], bool):
      raise UserError(f"config.{key}={given[key]!r} must be True or False")
  if config.diffusion.zero_terminal_snr and config.diffusion.prediction_type == "eps":
    raise UserError("config.diffusion.zero_terminal_snr=True needs prediction_type 'v' or 'x0': ε "
                    "prediction cannot recover x0 where alphas_cumprod is 0")
  if len(config.mesh.shape) != len(MESH_AXES):
    raise UserError(f"config.mesh.shape={tuple(config.mesh.shape)} needs one size per axis {MESH_AXES}")
  _check_model_shapes(config)
  _check_dataset(config)
  _check_sampling(config)
  _check_eval(config)


def _check_eval(config: ml_collections.ConfigDict) -> None:
  """The periodic evaluation's settings, so that it cannot fail after hours of training."""
  ev = config.eval
  if not ev.every_steps:
    return
  if config.model.conditioning != "none" and not all(isinstance(s, (int, float)) for s in ev.guidance_scales):
    raise UserError(f"config.eval.guidance_scales={tuple(ev.guidance_scales)} must be numbers")
  if ev.num_samples < 4:
    raise UserError(f"config.eval.num_samples={ev.num_samples} must be >= 4 (precision/recall compares each "
                    f"sample with its 3 nearest neighbours)")
  if resolved_feature_network(config) == "inception" and not os.path.isfile(os.path.expanduser(ev.inception_weights)):
    raise UserError(f"config.eval.every_steps={ev.every_steps} evaluates in Inception features, which need "
                    f"config.eval.inception_weights: {ev.inception_weights!r} is not a file (see the README's "
                    f"'Evaluating' section for the weights file)")


def resolved_feature_network(config: ml_collections.ConfigDict) -> str:
  """config.eval.feature_network, or the dataset's if ""."""
  from diffusion_jax.data import registry  # pylint: disable=g-import-not-at-top
  return config.eval.feature_network or registry.get(config.dataset.name).feature_network


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def _tuples(value: Any) -> Any:
  """JSON turns tuples into lists; the config uses tuples for sequences."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(_tuples(json.loads(text)))


def with_defaults(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`saved` on top of today's defaults, so a run written before a key existed still loads."""
  merged = get_default_config()
  for key, value in flatten(saved).items():
    *parents, leaf = key.split(".")
    node = merged
    for parent in parents:
      if parent not in node:
        node[parent] = ml_collections.ConfigDict()
      node = node[parent]
    node[leaf] = value
  return merged
