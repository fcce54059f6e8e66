"""Evaluate: checkpoint → metrics in workdir/eval/<step>.json.

python -m diffusion_jax.evaluate --workdir=runs/digits [--step=N] [--guidance_scales=1,3]
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

from diffusion_jax import cli, evaluation, inference
from diffusion_jax.data.builders import digits
from diffusion_jax.diffusion import vlb
from diffusion_jax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or exported directory to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_SCALES = flags.DEFINE_list("guidance_scales", ["1", "3"], "Guidance scales to measure.")
_TEMPLATES = flags.DEFINE_string("templates", "0", "Caption templates to prompt with: indices "
                                 f"into {digits.CAPTION_TEMPLATES} separated by ',', or 'all'.")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", 50, "Samples per digit, template and scale.")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_NLL_TIMESTEPS = flags.DEFINE_integer("nll_timesteps", 100, "Timesteps sampled per batch for the NLL "
                                      "bound (unbiased estimate); 0 = all T (exact in t); -1 = skip NLL.")
_NLL_VARIANCE = flags.DEFINE_enum("nll_variance", "fixed_large", list(vlb.MODEL_VARIANCES),
                                  "Fixed reverse-process variance for the NLL bound.")
flags.mark_flags_as_required(["workdir"])


def _parse_templates(text: str) -> list[int]:
  if text == "all":
    return list(range(len(digits.CAPTION_TEMPLATES)))
  try:
    templates = [int(t) for t in text.split(",")]
  except ValueError:
    templates = [-1]
  if any(not 0 <= t < len(digits.CAPTION_TEMPLATES) for t in templates):
    raise UserError(f"--templates={text!r}: give indices in [0, {len(digits.CAPTION_TEMPLATES)}) or 'all'")
  return templates


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  try:
    scales = [float(s) for s in _SCALES.value]
  except ValueError as exc:
    raise UserError(f"--guidance_scales={_SCALES.value}: {exc}") from exc
  loaded = inference.load(_WORKDIR.value, _STEP.value)
  metrics = evaluation.prompt_accuracy(loaded, scales, num_per_prompt=_NUM_PER_PROMPT.value,
                                       num_steps=_STEPS.value, seed=_SEED.value,
                                       templates=_parse_templates(_TEMPLATES.value))
  if _NLL_TIMESTEPS.value >= 0:
    metrics.update(evaluation.nll_bits_per_dim(
        loaded, num_timesteps=_NLL_TIMESTEPS.value or None, model_variance=_NLL_VARIANCE.value, seed=_SEED.value))
  result = {"step": loaded.step, "num_per_prompt": _NUM_PER_PROMPT.value, "sampler": "ddim",
            "steps": _STEPS.value, "seed": _SEED.value, **metrics}
  path = os.path.join(os.path.abspath(_WORKDIR.value), "eval", f"{loaded.step}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  os.replace(path + ".tmp", path)
  for name, value in metrics.items():
    logging.info("%s = %.4f", name, value)
  print(json.dumps(result, indent=2))
  print(f"metrics: {path}")


if __name__ == "__main__":
  cli.run(main)
