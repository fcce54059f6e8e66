"""Checkpoint → metrics (library side of `python -m diffusion_jax.evaluate`).

Prompt accuracy: sample `num_per_prompt` images for each digit's prompt at each guidance scale and
count how often a classifier trained on the real digits labels the sample as the prompted digit.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

import jax
import jax.numpy as jnp

from diffusion_jax import images as images_lib
from diffusion_jax import sampling
from diffusion_jax.data import pipeline
from diffusion_jax.data.builders import digits
from diffusion_jax.diffusion import vlb
from diffusion_jax.errors import UserError
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


# The settings that determine the metrics, in the order they lead a record.
SETTINGS = ("step", "num_per_prompt", "sampler", "steps", "seed", "nll_timesteps", "nll_variance")


def eval_settings(step: int, *, num_per_prompt: int, steps: int, seed: int, nll_timesteps: int,
                  nll_variance: str, sampler: str = "ddim") -> dict[str, Any]:
  """The settings of one evaluation as recorded; the NLL ones only if it computes the NLL (nll_timesteps >= 0)."""
  settings = {"step": step, "num_per_prompt": num_per_prompt, "sampler": sampler, "steps": steps, "seed": seed}
  if nll_timesteps >= 0:
    settings.update(nll_timesteps=nll_timesteps, nll_variance=nll_variance)
  return settings


def changed_settings(old: dict[str, Any], settings: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{name: (old value, new value)} for each of `settings` that the `old` record holds with another value."""
  return {k: (old[k], v) for k, v in settings.items() if k in old and old[k] != v}


def merge_records(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
  """`old` with `new`'s settings and metrics added or updated; the settings first, in SETTINGS order."""
  merged = {**old, **new}
  settings = {k: merged[k] for k in SETTINGS if k in merged}
  return {**settings, **{k: v for k, v in merged.items() if k not in settings}}


def metrics_path(workdir: str, out: str | None, step: int) -> str:
  """--out (an existing directory, or a path ending in '/', gets <step>.json inside) or <workdir>/eval/<step>.json."""
  if out is None:
    return os.path.join(os.path.abspath(workdir), "eval", f"{step}.json")
  if os.path.isdir(out) or out.endswith(os.sep):
    return os.path.join(os.path.abspath(out), f"{step}.json")
  return os.path.abspath(out)


def read_record(path: str) -> dict[str, Any] | None:
  """The metrics record at `path`, or None if there is none."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    if not isinstance(record, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as exc:
    raise UserError(f"cannot read the metrics in {path!r} ({exc}); pass --overwrite to replace them "
                    f"or --out=PATH to write elsewhere") from exc
  return record


def write_record(path: str, record: dict[str, Any]) -> None:
  """Writes `record` to `path` atomically: a reader sees the old file or the new one, never half of one."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)
