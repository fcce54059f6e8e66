"""The likelihood side of evaluation: the variational bound in bits/dim on the eval split (used by
`evaluate`; the sample side — FID, KID, precision/recall, IS, accuracy — is `sample_eval.py`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import compiler
from diffusion_jax.diffusion import vlb
from diffusion_jax.errors import UserError
from diffusion_jax.inference import LoadedModel

# The NLL's reverse variance: the run's own ('learned' if it learns Σ, else 'fixed_large'), or a named one.
NLL_VARIANCES = ("auto",) + vlb.MODEL_VARIANCES


def resolve_model_variance(config, model_variance: str = "auto") -> str:
  """'auto' → 'learned' for a run with diffusion.learn_sigma (improved DDPM), else 'fixed_large' (DDPM's
  CIFAR-10 choice); a named variance is checked against the run (only a learned-Σ run has 'learned')."""
  if model_variance not in NLL_VARIANCES:
    raise UserError(f"NLL model variance {model_variance!r} is not allowed; choose one of {list(NLL_VARIANCES)}")
  learns = bool(config.diffusion.learn_sigma)
  if model_variance == "auto":
    return "learned" if learns else "fixed_large"
  if model_variance == "learned" and not learns:
    raise UserError("NLL model variance 'learned' needs a run trained with diffusion.learn_sigma=True; this "
                    "run's variance is fixed: use 'fixed_large', 'fixed_small' or 'auto'")
  return model_variance


def nll_bits_per_dim(loaded: LoadedModel, *, split: str | None = None, num_timesteps: int | None = 100,
                     model_variance: str = "auto", seed: int = 0, batch_size: int | None = None) -> dict[str, float]:
  """Negative log-likelihood bound (DDPM's L_vlb) in bits/dim of `loaded`'s parameters over `split`: see
  NllBound. Returns {'nll_bits_per_dim', 'nll_num_images'}."""
  bound = NllBound(loaded.run, split=split, num_timesteps=num_timesteps, model_variance=model_variance,
                   seed=seed, batch_size=batch_size)
  return bound(loaded.params)


class NllBound:
  """params → the negative log-likelihood bound (DDPM's L_vlb) in bits/dim over `split` (default: the
  dataset's eval split), conditioned on each example's caption or label for conditional models.

  num_timesteps=None sums all T terms (exact in t, T network calls per image); K < T gives an unbiased
  estimate from K random timesteps per example. model_variance: see `resolve_model_variance` (a learned-Σ
  run uses its own variance by default).

  The split is read once, in batches of `batch_size` (default: config.batch_size; batch i draws its
  timesteps and noise from fold_in(PRNGKey(seed), i)); the last batch is padded to the same size by
  repeating its last example (the padding's values are dropped), so the bound compiles once.
  """

  def __init__(self, run, *, split: str | None = None, num_timesteps: int | None = 100,
               model_variance: str = "auto", seed: int = 0, batch_size: int | None = None):
    from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (grain/TFDS)
    config = run.config
    if run.autoencoder.kind != "pixels":
      raise UserError(f"the NLL bound is in bits per pixel dimension; this model diffuses in "
                      f"model.autoencoder={run.autoencoder.kind!r} latents, whose bound is not the images' NLL")
    model_variance = resolve_model_variance(config, model_variance)
    keys = tuple(run.conditioning.input_keys)

    @compiler.jit
    def batch_bpd(params, images_uint8, inputs, rng):
      predict = lambda x_t, t: run.model.apply({"params": params}, x_t, t, inputs)
      return vlb.bits_per_dim(predict, run.autoencoder.encode(params, images_uint8), run.schedule, rng,
                              prediction_type=config.diffusion.prediction_type, model_variance=model_variance,
                              num_timesteps=num_timesteps)

    self._batch_bpd = batch_bpd
    tokenizer = getattr(run.conditioning, "tokenizer", None)
    batch_size = batch_size or config.batch_size
    reading = config.copy_and_resolve_references()
    with reading.unlocked():
      reading.batch_size = batch_size
    # (images uint8 [b, H, W, C], conditioning inputs, key, number of real rows) per batch.
    self._batches = []
    for i, batch in enumerate(pipeline.iterate_split(reading, split or run.dataset.eval_split, tokenizer=tokenizer)):
      rows = len(batch["image"])
      batch = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - rows, axis=0)]) for k, v in batch.items()}
      self._batches.append((jnp.asarray(batch["image"]), {k: jnp.asarray(batch[k]) for k in keys},
                            jax.random.fold_in(jax.random.PRNGKey(seed), i), rows))

  def compile(self, abstract_params: Any) -> None:
    """Compiles the bound for parameters of these shapes (and shardings) ahead of the first call (every
    batch has the same shape), for a caller that has idle time now."""
    images, inputs, rng, _ = self._batches[0]
    self._batch_bpd.lower(abstract_params, images, inputs, rng).compile()

  def __call__(self, params: Any) -> dict[str, float]:
    """{'nll_bits_per_dim': the mean bound over the split's images, 'nll_num_images'}."""
    values = np.concatenate([np.asarray(self._batch_bpd(params, images, inputs, rng))[:rows]
                             for images, inputs, rng, rows in self._batches])
    return {"nll_bits_per_dim": float(values.mean()), "nll_num_images": float(len(values))}
