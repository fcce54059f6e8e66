"""The peer: diffusers' Flax Stable Diffusion U-Net, trained and sampled as diffusers does it.

- `make_peer_unet` / `init_peer_params`: FlaxUNet2DConditionModel of a preset's layout, float32 parameters.
- `make_peer_train_step`: the step of diffusers' examples/text_to_image/train_text_to_image_flax.py
  (noise, t ~ U{0, …, 999}, `FlaxDDPMScheduler.add_noise` on the scaled-linear schedule, ε-MSE,
  clip_by_global_norm(1) → AdamW(1e-4, wd 1e-2)), on precomputed latents and a precomputed context
  (that example's text encoder and VAE are frozen).
- `make_peer_sample_fn`: the denoising loop of FlaxStableDiffusionPipeline._generate (a `fori_loop` of
  FlaxDDIMScheduler steps with classifier-free guidance on the doubled batch), without the VAE decode.
- `peer_params_to_ours`: the peer's U-Net parameters under our module names, so the tests can check
  that both networks compute the same function.

diffusers is imported lazily (only here, only when used) with USE_TORCH=0, so that it takes its Flax-only
paths: with torch and torchvision installed (the `reference` extra) its torch paths break the import.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import presets

INSTALL_HINT = "pip install -e '.[bench]'"
NUM_TRAIN_TIMESTEPS = 1000
# Stable Diffusion's noise schedule and DDIM settings (its scheduler_config.json).
_SD_SCHEDULE = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear")
_SD_DDIM = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class PeerUnavailable(RuntimeError):
  """diffusers cannot be imported; the message names the install command."""


def _diffusers():
  """The diffusers classes the peer uses: (FlaxUNet2DConditionModel, FlaxDDPMScheduler, FlaxDDIMScheduler)."""
  os.environ.setdefault("USE_TORCH", "0")
  try:
    # pylint: disable=g-import-not-at-top
    from diffusers.models.unets.unet_2d_condition_flax import FlaxUNet2DConditionModel
    from diffusers.schedulers.scheduling_ddim_flax import FlaxDDIMScheduler
    from diffusers.schedulers.scheduling_ddpm_flax import FlaxDDPMScheduler
  except ImportError as exc:
    raise PeerUnavailable(f"diffusers is not installed ({exc}); {INSTALL_HINT}") from exc
  return FlaxUNet2DConditionModel, FlaxDDPMScheduler, FlaxDDIMScheduler


def available() -> str | None:
  """None if the peer can run, else a one-line reason naming the install command."""
  try:
    _diffusers()
  except PeerUnavailable as exc:
    return str(exc)
  return None


def make_peer_unet(preset: presets.Preset, dtype: str | None = None):
  """The peer's FlaxUNet2DConditionModel: sample [B, 4, S, S], t [B], context [B, L, D] → [B, 4, S, S]."""
  unet_cls, _, _ = _diffusers()
  return unet_cls(**presets.peer_unet_kwargs(preset, dtype))


def init_peer_params(unet, seed: int = 0) -> Any:
  """float32 parameters (a plain dict) with the distributions `unet.init_weights` draws: every peer layer
  is a Flax default (Dense, Conv: LeCun-normal kernels, i.e. truncated to ±2σ with σ = 1/√fan_in; zero
  biases; GroupNorm, LayerNorm: unit scales, zero biases). Drawn by numpy from the parameter shapes:
  `init_weights` compiles the whole forward pass (and a jitted per-leaf init hundreds of RNG programs),
  tens of seconds on a CPU for values that do not affect speed."""
  shapes = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":  # [..., fan_in, fan_out]: Dense [in, out], Conv [kh, kw, in, out].
      values = rng.standard_normal(s.shape, np.float32)  # float32 draws: half the time of float64's (865M at sd21).
      while np.any(outside := np.abs(values) > 2):
        values[outside] = rng.standard_normal(int(outside.sum()), np.float32)
      stddev = np.sqrt(1.0 / np.prod(s.shape[:-1])) / 0.87962566103423978  # Flax's truncation correction.
      return jnp.asarray(values * stddev, jnp.float32)
    if name in ("scale", "bias"):
      return (jnp.ones if name == "scale" else jnp.zeros)(s.shape, jnp.float32)
    raise ValueError(f"peer parameter {jax.tree_util.keystr(path)}: no Flax default initializer known")

  return jax.tree_util.tree_map_with_path(draw, shapes)


def peer_optimizer() -> optax.GradientTransformation:
  """The example's defaults: --max_grad_norm=1, --learning_rate=1e-4 (constant), adam β, ε, weight decay."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2))


def make_peer_train_step(unet) -> tuple[Callable, Callable]:
  """(init(params) → state, step(state, batch) → (state, loss)); step is jitted and donates the state.

  batch: {'latents': float32 [B, 4, S, S], 'context': [B, L, D], 'rng': a key}.
  state: {'params', 'opt_state', 'step'}, as flax.training.TrainState holds them.
  """
  _, ddpm_cls, _ = _diffusers()
  scheduler = ddpm_cls(**_SD_SCHEDULE)
  scheduler_state = scheduler.create_state()
  tx = peer_optimizer()

  def init(params):
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  def step(state, batch):
    noise_rng, timestep_rng = jax.random.split(jax.random.fold_in(batch["rng"], state["step"]))
    latents = batch["latents"]

    def compute_loss(params):
      noise = jax.random.normal(noise_rng, latents.shape)
      timesteps = jax.random.randint(timestep_rng, (latents.shape[0],), 0, NUM_TRAIN_TIMESTEPS)
      noisy_latents = scheduler.add_noise(scheduler_state, latents, noise, timesteps)
      model_pred = unet.apply({"params": params}, noisy_latents, timesteps, batch["context"], train=True).sample
      return jnp.mean((noise - model_pred) ** 2)

    loss, grads = jax.value_and_grad(compute_loss)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

  return init, jax.jit(step, donate_argnums=0)


def make_peer_sample_fn(unet, num_inference_steps: int = 50) -> tuple[Callable, Any]:
  """(sample, scheduler_state): sample(params, scheduler_state, prompt_embeds [N, L, D],
  negative_prompt_embeds [N, L, D], guidance_scale float32 [], rng) → latents float32 [N, 4, S, S], jitted.

  The body of FlaxStableDiffusionPipeline._generate after its text encoder and before its VAE decode.
  """
  _, _, ddim_cls = _diffusers()
  scheduler = ddim_cls(**_SD_SCHEDULE, **_SD_DDIM)
  in_channels, size = unet.in_channels, unet.sample_size

  def sample(params, scheduler_state, prompt_embeds, negative_prompt_embeds, guidance_scale, rng):
    context = jnp.concatenate([negative_prompt_embeds, prompt_embeds])
    guidance_scale = jnp.asarray(guidance_scale, jnp.float32).reshape((1,))
    latents = jax.random.normal(rng, (prompt_embeds.shape[0], in_channels, size, size), jnp.float32)

    def loop_body(step, args):
      latents, scheduler_state = args
      latents_input = jnp.concatenate([latents] * 2)
      t = jnp.array(scheduler_state.timesteps, dtype=jnp.int32)[step]
      timestep = jnp.broadcast_to(t, latents_input.shape[0])
      latents_input = scheduler.scale_model_input(scheduler_state, latents_input, t)
      noise_pred = unet.apply({"params": params}, jnp.array(latents_input), jnp.array(timestep, dtype=jnp.int32),
                              encoder_hidden_states=context).sample
      noise_pred_uncond, noise_prediction_text = jnp.split(noise_pred, 2, axis=0)
      noise_pred = noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)
      latents, scheduler_state = scheduler.step(scheduler_state, noise_pred, t, latents).to_tuple()
      return latents, scheduler_state

    scheduler_state = scheduler.set_timesteps(scheduler_state, num_inference_steps=num_inference_steps,
                                              shape=latents.shape)
    latents = latents * scheduler_state.init_noise_sigma
    latents, _ = jax.lax.fori_loop(0, num_inference_steps, loop_body, (latents, scheduler_state))
    return latents

  return jax.jit(sample), scheduler.create_state()


# The peer's parameter names → ours (models/unet.py), one table per kind of block.
_RES = {"norm1": "norm_1", "conv1": "conv_1", "time_emb_proj": "time_proj", "norm2": "norm_2", "conv2": "conv_2",
        "conv_shortcut": "skip"}
_TRANSFORMER_BLOCK = {"norm1": "ln_self", "attn1": "self_attn", "norm2": "ln_cross", "attn2": "cross_attn",
                      "norm3": "ln_ff"}
_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "out"}


def _index(name: str, prefix: str) -> int:
  return int(name[len(prefix):])


def _spatial_transformer_path(path: tuple[str, ...]) -> tuple[str, ...]:
  """A path inside the peer's FlaxTransformer2DModel → ours inside SpatialTransformer."""
  head, rest = path[0], path[1:]
  if head in ("norm", "proj_in", "proj_out"):
    return path
  block = f"block_{_index(head, 'transformer_blocks_')}"
  sub, rest = rest[0], rest[1:]
  if sub == "ff":  # ff/net_0/proj (GEGLU's [value, gate] projection) and ff/net_2.
    return (block, "ff_in" if rest[0] == "net_0" else "ff_out") + rest[-1:]
  if sub in ("attn1", "attn2"):
    return (block, _TRANSFORMER_BLOCK[sub], _ATTENTION[rest[0]]) + rest[1:]
  return (block, _TRANSFORMER_BLOCK[sub]) + rest


def _our_path(path: tuple[str, ...], levels: int) -> tuple[str, ...]:
  """The peer's path of one parameter → our path under params['unet']."""
  head = path[0]
  if head in ("conv_in", "conv_out"):
    return path
  if head == "conv_norm_out":
    return ("norm_out",) + path[1:]
  if head == "time_embedding":  # linear_1, linear_2.
    return (f"time_mlp_{path[1][-1]}",) + path[2:]
  if head == "mid_block":
    kind, index = path[1].rsplit("_", 1)
    if kind == "resnets":
      return (f"mid_res_{int(index) + 1}", _RES[path[2]]) + path[3:]
    return ("mid_attn",) + _spatial_transformer_path(path[2:])
  if head.startswith("down_blocks_"):
    way, level = "down", _index(head, "down_blocks_")
  else:  # up_blocks_i runs over the levels from the deepest up.
    way, level = "up", levels - 1 - _index(head, "up_blocks_")
  kind, index = path[1].rsplit("_", 1)
  if kind in ("downsamplers", "upsamplers"):  # {down,up}samplers_0/conv/{kernel,bias}.
    return (f"{way}_{level}_{kind[:-1].replace('sampler', 'sample')}",) + path[3:]
  if kind == "resnets":
    return (f"{way}_{level}_res_{index}", _RES[path[2]]) + path[3:]
  return (f"{way}_{level}_attn_{index}",) + _spatial_transformer_path(path[2:])


def peer_params_to_ours(peer_params: Any, levels: int) -> dict:
  """The peer's U-Net parameters as our UNet's (params['unet']): same arrays, our names. Both sides
  store Dense kernels as [in, out] and convolution kernels as [kh, kw, in, out], so no array changes."""
  ours: dict = {}
  flat = jax.tree_util.tree_flatten_with_path(peer_params)[0]
  for key_path, value in flat:
    path = tuple(str(getattr(k, "key", k)) for k in key_path)
    node = ours
    target = _our_path(path, levels)
    for name in target[:-1]:
      node = node.setdefault(name, {})
    if target[-1] in node:
      raise ValueError(f"two peer parameters map to {'/'.join(target)}")
    node[target[-1]] = value
  return ours

