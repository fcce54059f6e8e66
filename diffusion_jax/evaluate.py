"""Evaluate: checkpoint → metrics in workdir/eval/<step>.json.

python -m diffusion_jax.evaluate --workdir=runs/digits [--step=N] [--guidance_scales=1,3]

The file is one flat JSON object: the settings that determine the metrics ("step", "num_per_prompt",
"sampler", "steps", "seed", and "nll_timesteps", "nll_variance" when the NLL is computed), then the metrics
("accuracy/template_<i>/guidance_<s>", "classifier_test_accuracy", "nll_bits_per_dim", …). Evaluating the
same step again with the same settings adds to the file (e.g. another guidance scale); other settings are
refused unless --overwrite replaces the file or --out=PATH writes elsewhere.
"""

from __future__ import annotations

import json
import math
import os
from absl import flags, logging

from diffusion_jax import cli, inference, paths, run_files
from diffusion_jax.metrics import sample_quality
from diffusion_jax.data import registry
from diffusion_jax.diffusion import vlb
from diffusion_jax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or exported directory to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_SCALES = flags.DEFINE_list("guidance_scales", ["1", "3"], "Guidance scales to measure.")
_TEMPLATES = flags.DEFINE_string("templates", "0", "Text models: the dataset's caption templates to prompt "
                                 "with, as indices separated by ',', or 'all'.")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", 50, "Samples per class, template and scale.")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_NLL_TIMESTEPS = flags.DEFINE_integer("nll_timesteps", 100, "Timesteps sampled per batch for the NLL "
                                      "bound (unbiased estimate), at most T; 0 = all T (exact in t); -1 = skip NLL.")
_NLL_VARIANCE = flags.DEFINE_enum("nll_variance", "fixed_large", list(vlb.MODEL_VARIANCES),
                                  "Fixed reverse-process variance for the NLL bound.")
_OUT = flags.DEFINE_string("out", None, "Metrics JSON to write (an existing directory gets <step>.json inside); "
                           "default: <workdir>/eval/<step>.json.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing metrics file instead of adding to it "
                               "(needed when it was evaluated with other settings).")
flags.mark_flags_as_required(["workdir"])

def _parse_scales(values: list[str]) -> list[float]:
  try:
    scales = [float(s) for s in values]
  except ValueError as exc:
    raise UserError(f"--guidance_scales={','.join(values)}: {exc}") from exc
  if not scales or not all(math.isfinite(s) for s in scales):
    raise UserError(f"--guidance_scales={','.join(values)} is not allowed; give finite numbers separated by ','")
  return scales


def _parse_templates(text: str, num_templates: int) -> list[int]:
  if text == "all":
    return list(range(num_templates))
  try:
    templates = [int(t) for t in text.split(",")]
  except ValueError:
    templates = [-1]
  if any(not 0 <= t < num_templates for t in templates):
    raise UserError(f"--templates={text!r}: give indices in [0, {num_templates}) or 'all'")
  return templates


def _check_counts(num_timesteps: int) -> None:
  """--num_per_prompt, --steps and --nll_timesteps against the run's T = config.diffusion.num_timesteps."""
  if _NUM_PER_PROMPT.value < 1:
    raise UserError(f"--num_per_prompt={_NUM_PER_PROMPT.value} is not allowed; give an integer >= 1")
  if not 1 <= _STEPS.value <= num_timesteps:
    raise UserError(f"--steps={_STEPS.value} is not allowed; give an integer in [1, {num_timesteps}] "
                    f"(config.diffusion.num_timesteps={num_timesteps})")
  if not -1 <= _NLL_TIMESTEPS.value <= num_timesteps:
    raise UserError(f"--nll_timesteps={_NLL_TIMESTEPS.value} is not allowed; give -1 (skip the NLL), 0 (all "
                    f"{num_timesteps} timesteps) or K in [1, {num_timesteps}] (config.diffusion.num_timesteps)")


def _check_writable(directory: str) -> None:
  if _OUT.value is not None:
    paths.ensure_writable_dir(directory, "--out directory")
    return
  try:
    paths.ensure_writable_dir(directory, "eval directory of --workdir")
  except UserError as exc:
    raise UserError(f"{exc}, or pass --out=PATH to write the metrics elsewhere") from exc


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  # Every flag and the output directory are checked before the model loads.
  scales = _parse_scales(_SCALES.value)
  config = inference.read_config(_WORKDIR.value)
  dataset = registry.get(config.dataset.name)
  templates = _parse_templates(_TEMPLATES.value, dataset.num_caption_templates)
  _check_counts(config.diffusion.num_timesteps)
  _check_writable(os.path.dirname(run_files.metrics_path(_WORKDIR.value, _OUT.value, step=0)))
  loaded = inference.load(_WORKDIR.value, _STEP.value)
  path = run_files.metrics_path(_WORKDIR.value, _OUT.value, loaded.step)
  settings = run_files.eval_settings(loaded.step, num_per_prompt=_NUM_PER_PROMPT.value, steps=_STEPS.value,
                           seed=_SEED.value, nll_timesteps=_NLL_TIMESTEPS.value, nll_variance=_NLL_VARIANCE.value)
  old = None if _OVERWRITE.value else run_files.read_record(path)
  changed = run_files.changed_settings(old or {}, settings)
  if changed:
    differences = ", ".join(f"{k} ({old_value!r} there, {new_value!r} now)"
                            for k, (old_value, new_value) in changed.items())
    raise UserError(f"{path!r} holds metrics of other settings: {differences}; pass the same settings to add "
                    f"to it, --overwrite to replace it, or --out=PATH to write elsewhere")

  metrics = {}
  if dataset.reference_classifier is not None:
    metrics.update(sample_quality.sample_accuracy(loaded, scales, num_per_class=_NUM_PER_PROMPT.value,
                                              num_steps=_STEPS.value, seed=_SEED.value, templates=templates))
  else:
    logging.warning("Dataset %r has no reference classifier: no sample accuracy, only the NLL.", dataset.name)
  if _NLL_TIMESTEPS.value >= 0:
    metrics.update(sample_quality.nll_bits_per_dim(
        loaded, num_timesteps=_NLL_TIMESTEPS.value or None, model_variance=_NLL_VARIANCE.value, seed=_SEED.value))
  record = run_files.merge_records(old or {}, {**settings, **metrics})
  run_files.write_record(path, record)
  for name, value in metrics.items():
    logging.info("%s = %.4f", name, value)
  print(json.dumps(record, indent=2))
  print(f"metrics: {path}")


if __name__ == "__main__":
  cli.run(main)
