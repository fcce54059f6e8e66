"""The training objective on held-out data with fixed draws: `eval_loss`, which ranks checkpoints.

The same examples, timesteps and noise are used at every call, so two checkpoints are compared on
exactly the same problem and the difference is not Monte-Carlo noise. Timesteps are stratified
(evenly spaced over [0, T), then shuffled) so every noise level is represented. Conditioning inputs
are kept (never dropped to the null condition).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from diffusion_jax import compiler
from diffusion_jax import train_step as train_step_lib
from diffusion_jax.parallel import mesh as mesh_lib


def load_examples(run, num_examples: int, split: str | None = None) -> dict[str, np.ndarray]:
  """The first min(num_examples, len(split)) examples of `split` (default: the dataset's eval split),
  rounded down to whole batches (at least one batch): {'image': uint8 [N, H, W, C], + conditioning inputs}."""
  from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (grain/TFDS: training only)
  config, keys = run.config, ("image",) + tuple(run.conditioning.input_keys)
  split = split or run.dataset.eval_split
  tokenizer = getattr(run.conditioning, "tokenizer", None)
  parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
  for batch in pipeline.iterate_split(config, split, tokenizer=tokenizer):
    for k in keys:
      parts[k].append(batch[k])
    if sum(len(i) for i in parts["image"]) >= num_examples:
      break
  examples = {k: np.concatenate(v) for k, v in parts.items()}
  available = len(examples["image"])
  n = max(config.batch_size, min(num_examples, available) // config.batch_size * config.batch_size)
  if n > available:
    raise ValueError(f"the {split!r} split has {available} examples, fewer than one batch ({config.batch_size})")
  return {k: v[:n] for k, v in examples.items()}


class HeldOutLoss:
  """params → mean weighted loss over fixed examples (see `make_held_out_loss`)."""

  def __init__(self, batch_loss, batches: list[dict[str, Any]]):
    self._batch_loss, self._batches = batch_loss, batches

  def __call__(self, params: Any) -> float:
    return float(np.mean([jax.device_get(self._batch_loss(params, b)) for b in self._batches]))

  def compile(self, abstract_params: Any) -> None:
    """Compiles the loss for parameters of these shapes and shardings ahead of the first call (every batch
    has the same shape), for a caller that has idle time now."""
    self._batch_loss.lower(abstract_params, self._batches[0]).compile()


def make_held_out_loss(run, examples: dict[str, np.ndarray]) -> HeldOutLoss:
  """params → mean weighted loss over `examples`, in batches of config.batch_size.

  Every process must hold the same `examples`; each batch is laid out over (data, fsdp).
  """
  config = run.config
  n = len(examples["image"])
  rng = np.random.default_rng(config.seed)
  t = rng.permutation((np.arange(n) * run.schedule.num_timesteps) // n).astype(np.int32)
  noise = rng.standard_normal((n,) + tuple(run.model.latent_shape)).astype(np.float32)
  sharding = mesh_lib.batch_sharding(run.mesh)
  place = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
  cond_keys = tuple(run.conditioning.input_keys)
  batches = [{"image": place(examples["image"][i:i + config.batch_size]),
              "cond": {k: place(examples[k][i:i + config.batch_size]) for k in cond_keys},
              "t": place(t[i:i + config.batch_size]), "noise": place(noise[i:i + config.batch_size])}
             for i in range(0, n, config.batch_size)]

  @compiler.jit
  def batch_loss(params, batch):
    inputs = dict(batch, x0=run.autoencoder.encode(params, batch["image"]))  # Latent models: the mean.
    return train_step_lib.example_losses(run.model, params, inputs, run.schedule, config).mean()

  return HeldOutLoss(batch_loss, batches)
