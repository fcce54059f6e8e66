"""Checkpoint → metrics (library side of `python -m diffusion_jax.evaluate`).

Prompt accuracy: sample `num_per_prompt` images for each digit's prompt at each guidance scale and
count how often a classifier trained on the real digits labels the sample as the prompted digit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import jax
import jax.numpy as jnp

from diffusion_jax import images as images_lib
from diffusion_jax import sampling
from diffusion_jax.data import pipeline
from diffusion_jax.data.builders import digits
from diffusion_jax.diffusion import vlb
from diffusion_jax.inference import LoadedModel
from diffusion_jax.metrics.digit_classifier import train_on_real_digits


def prompt_accuracy(loaded: LoadedModel, guidance_scales: Sequence[float], *, num_per_prompt: int,
                    num_steps: int, seed: int, templates: Sequence[int] = (0,), eta: float = 0.0
                    ) -> dict[str, float]:
  """{'classifier_test_accuracy', 'accuracy/template_<i>/guidance_<s>', …} from one compiled sampler call."""
  classifier, test_accuracy = train_on_real_digits()
  prompts, labels, scales, keys = [], [], [], []
  for template in templates:
    for scale in guidance_scales:
      for digit in range(10):
        prompts += [digits.caption_for(digit, template)] * num_per_prompt
        labels += [digit] * num_per_prompt
        scales += [scale] * num_per_prompt
        keys += [(template, scale)] * num_per_prompt
  options = sampling.sampler_options(loaded.config, sampler="ddim", num_steps=num_steps, eta=eta)
  sample_fn = sampling.make_sample_fn(loaded.model, loaded.schedule, options)
  images = sampling.generate(sample_fn, loaded.params, loaded.tokenizer, prompts, scales, seed)
  correct = classifier.predict(images_lib.to_uint8(images)) == np.asarray(labels)
  metrics = {"classifier_test_accuracy": test_accuracy}
  keys_array = np.asarray([f"accuracy/template_{t}/guidance_{s:g}" for t, s in keys])
  for name in dict.fromkeys(keys_array):
    metrics[str(name)] = float(correct[keys_array == name].mean())
  return metrics


def nll_bits_per_dim(loaded: LoadedModel, *, split: str = "test", num_timesteps: int | None = 100,
                     model_variance: str = "fixed_large", seed: int = 0) -> dict[str, float]:
  """Caption-conditional negative log-likelihood bound (DDPM's L_vlb) in bits/dim over `split`.

  num_timesteps=None sums all T terms (exact in t, T network calls per image); K < T gives an unbiased
  estimate from K random timesteps per batch. Returns {'nll_bits_per_dim', 'nll_num_images'}.
  """
  config = loaded.config

  @jax.jit
  def batch_bpd(images_uint8, tokens, rng):
    predict = lambda x_t, t: loaded.model.apply({"params": loaded.params}, x_t, t, tokens)
    return vlb.bits_per_dim(predict, images_lib.to_model_range(images_uint8), loaded.schedule, rng,
                            prediction_type=config.diffusion.prediction_type, model_variance=model_variance,
                            num_timesteps=num_timesteps)

  values = []
  for i, batch in enumerate(pipeline.iterate_split(config, split)):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    values.append(np.asarray(batch_bpd(jnp.asarray(batch["image"]), jnp.asarray(batch["tokens"]), rng)))
  values = np.concatenate(values)
  return {"nll_bits_per_dim": float(values.mean()), "nll_num_images": float(len(values))}
