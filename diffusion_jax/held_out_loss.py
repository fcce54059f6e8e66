"""The training objective on held-out data with fixed draws: `eval_loss`, which ranks checkpoints.

The same examples, timesteps and noise are used at every call, so two checkpoints are compared on
exactly the same problem and the difference is not Monte-Carlo noise. Timesteps are stratified
(evenly spaced over [0, T), then shuffled) so every noise level is represented.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import images as images_lib
from diffusion_jax.data import pipeline
from diffusion_jax.diffusion import losses, schedules
from diffusion_jax.models.unet import TextToImageModel
from diffusion_jax.parallel import mesh as mesh_lib


def load_examples(config, num_examples: int, split: str = "test") -> dict[str, np.ndarray]:
  """The first min(num_examples, len(split)) examples of `split`, rounded down to whole batches
  (at least one batch): {'image': uint8 [N, H, W, C], 'tokens': int32 [N, L]}."""
  images, tokens = [], []
  for batch in pipeline.iterate_split(config, split):
    images.append(batch["image"])
    tokens.append(batch["tokens"])
    if sum(len(i) for i in images) >= num_examples:
      break
  images, tokens = np.concatenate(images), np.concatenate(tokens)
  n = max(config.batch_size, min(num_examples, len(images)) // config.batch_size * config.batch_size)
  if n > len(images):
    raise ValueError(f"the {split!r} split has {len(images)} examples, fewer than one batch ({config.batch_size})")
  return {"image": images[:n], "tokens": tokens[:n]}


def make_held_out_loss(config, model: TextToImageModel, schedule: schedules.NoiseSchedule, mesh,
                       examples: dict[str, np.ndarray]) -> Callable[[Any], float]:
  """params → mean weighted loss over `examples` (captions kept), in batches of config.batch_size.

  Every process must hold the same `examples`; each batch is laid out over (data, fsdp).
  """
  n = len(examples["image"])
  rng = np.random.default_rng(config.seed)
  t = rng.permutation((np.arange(n) * schedule.num_timesteps) // n).astype(np.int32)
  noise = rng.standard_normal(examples["image"].shape).astype(np.float32)
  sharding = mesh_lib.batch_sharding(mesh)
  place = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
  batches = [{"image": place(examples["image"][i:i + config.batch_size]),
              "tokens": place(examples["tokens"][i:i + config.batch_size]),
              "t": place(t[i:i + config.batch_size]), "noise": place(noise[i:i + config.batch_size])}
             for i in range(0, n, config.batch_size)]

  @jax.jit
  def batch_loss(params, batch):
    predict = lambda x_t, t_: model.apply({"params": params}, x_t, t_, batch["tokens"])
    return jnp.mean(losses.per_example_loss(
        predict, images_lib.to_model_range(batch["image"]), batch["t"], batch["noise"], schedule,
        config.diffusion.prediction_type, weighting=config.diffusion.loss_weighting,
        min_snr_gamma=config.diffusion.min_snr_gamma))

  return lambda params: float(np.mean([jax.device_get(batch_loss(params, b)) for b in batches]))
