"""Checkpoint → metrics (library side of `python -m diffusion_jax.evaluate`).

Prompt accuracy: sample `num_per_prompt` images for each digit's prompt at each guidance scale and
count how often a classifier trained on the real digits labels the sample as the prompted digit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from diffusion_jax import images as images_lib
from diffusion_jax import sampling
from diffusion_jax.data.builders import digits
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
  sample_fn = sampling.make_sample_fn(loaded.model, loaded.schedule, sampler="ddim", num_steps=num_steps,
                                      eta=eta, prediction_type=loaded.config.diffusion.prediction_type)
  images = sampling.generate(sample_fn, loaded.params, loaded.tokenizer, prompts, scales, seed)
  correct = classifier.predict(images_lib.to_uint8(images)) == np.asarray(labels)
  metrics = {"classifier_test_accuracy": test_accuracy}
  keys_array = np.asarray([f"accuracy/template_{t}/guidance_{s:g}" for t, s in keys])
  for name in dict.fromkeys(keys_array):
    metrics[str(name)] = float(correct[keys_array == name].mean())
  return metrics
