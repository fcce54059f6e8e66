"""Sample: prompts (text models), labels (class models) or nothing (unconditional) → samples.npz + a PNG grid.

python -m diffusion_jax.sample --workdir=runs/digits --prompts="a handwritten digit 3;the number seven" \
    --num_per_prompt=16 --guidance_scale=3 --sampler=ddim --steps=50 --seed=0 --out=samples.npz
python -m diffusion_jax.sample --workdir=runs/digits_class --labels=3,7,7 --guidance_scale=3
python -m diffusion_jax.sample --workdir=runs/digits_uncond --num_per_prompt=64
"""

from __future__ import annotations

from diffusion_jax import host_memory

if __name__ == "__main__":
  host_memory.use_huge_pages()  # Re-executes this command with huge pages for XLA's buffers, before JAX loads.

# pylint: disable=wrong-import-position  (the imports below load JAX)
import math
import os

import numpy as np
from absl import flags, logging

from diffusion_jax import cli, generation, inference, paths
from diffusion_jax import images as images_lib
from diffusion_jax import build
from diffusion_jax.data import registry
from diffusion_jax.diffusion import samplers
from diffusion_jax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Training workdir (config.json + checkpoints/) or exported directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a training workdir; default: the latest.")
_PROMPTS = flags.DEFINE_string("prompts", None, "Text models: ';'-separated prompts; default: the dataset's "
                               "canonical prompt of each class.")
_LABELS = flags.DEFINE_string("labels", None, "Class models: ','-separated labels (e.g. 3,7,7); default: "
                              "each of the dataset's classes.")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", 8, "Images per prompt or label; for unconditional "
                                       "models, the number of images.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale s (1 = no guidance); "
                                "default: the run's config.sampling.guidance_scale.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Prompt for the unconditional branch (default: '').")
# Sampler options; each defaults to the run's config.sampling value.
_SAMPLER = flags.DEFINE_enum("sampler", None, list(samplers.SAMPLERS), "Sampler.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps.")
_SPACING = flags.DEFINE_enum("spacing", None, list(samplers.SPACINGS), "Timestep spacing.")
_ETA = flags.DEFINE_float("eta", None, "DDIM η (0 = deterministic).")
_X0_CLIPPING = flags.DEFINE_enum("x0_clipping", None, list(samplers.X0_CLIPPINGS), "Clipping of x̂0.")
_RESCALE = flags.DEFINE_float("guidance_rescale", None, "Guidance rescale φ (Lin et al. 2023).")
_INTERVAL = flags.DEFINE_list("guidance_interval", None, "lo,hi: guidance only for t/T in [lo, hi].")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", "samples.npz", "Output .npz (`.npz` is appended to a path without it; an "
                           "existing directory, or a path ending in '/', gets samples.npz inside); the PNG "
                           "grid is written beside it.")
flags.mark_flags_as_required(["workdir"])


def output_paths(out: str) -> tuple[paths.epath.Path, paths.epath.Path]:
  """(samples .npz, PNG grid) for --out (a local path or a URL): an existing directory (or a path ending
  in '/') gets samples.npz inside, a path without the .npz suffix gets it appended (as np.savez would)."""
  if not out:
    raise UserError("--out is empty; give a .npz path or a directory")
  if out.endswith(("/", os.sep)) or paths.resolve(out).is_dir():
    npz = paths.resolve(out) / "samples.npz"
  else:
    npz = paths.resolve(out if out.endswith(".npz") else out + ".npz")
  return npz, npz.with_suffix(".png")


def requests_from_flags(config) -> list:
  """One entry per grid row: the prompts (text), the labels (class) or one placeholder (unconditional);
  a one-line error when the flags do not fit the model's conditioning."""
  kind, dataset = config.model.conditioning, registry.get(config.dataset.name)
  given = {"--prompts": _PROMPTS.value, "--labels": _LABELS.value}
  wanted = {"text": "--prompts", "class": "--labels", "none": None}[kind]
  for flag, value in given.items():
    if value is not None and flag != wanted:
      hint = f"it takes {wanted}" if wanted else "it takes only --num_per_prompt (the number of images)"
      raise UserError(f"{flag} does not apply: this model's conditioning is {kind!r}; {hint}")
  if kind != "text" and _NEGATIVE.value:
    raise UserError(f"--negative_prompt needs a text model; this model's conditioning is {kind!r}")
  conditioning = build.create_conditioning(config, dataset)
  if kind == "text":
    rows = generation.parse_prompts(_PROMPTS.value) if _PROMPTS.value is not None else list(dataset.canonical_prompts())
    if not rows:
      raise UserError("give at least one prompt (--prompts='a;b')")
    conditioning.inputs_for(rows + [_NEGATIVE.value or ""])  # Over-long prompts fail here, before loading.
  elif kind == "class":
    rows = generation.parse_labels(_LABELS.value) if _LABELS.value is not None else list(dataset.canonical_labels)
    if not rows:
      raise UserError("give at least one label (--labels=3,7)")
    conditioning.inputs_for(rows)  # Out-of-range labels fail here.
  else:
    rows = [None]
  return rows


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  if _NUM_PER_PROMPT.value < 1:
    raise UserError(f"--num_per_prompt={_NUM_PER_PROMPT.value} is not allowed; give an integer >= 1")
  if _GUIDANCE.value is not None and not math.isfinite(_GUIDANCE.value):
    raise UserError(f"--guidance_scale={_GUIDANCE.value} is not allowed; give a finite number (1 = no guidance)")
  # Fail on a bad workdir, prompt, label or an unwritable --out before loading or compiling anything.
  config = inference.read_config(_WORKDIR.value)
  rows = requests_from_flags(config)
  out, png = output_paths(_OUT.value)
  paths.ensure_writable_dir(out.parent, "--out directory")
  interval = None
  if _INTERVAL.value is not None:
    try:
      interval = tuple(float(v) for v in _INTERVAL.value)
    except ValueError as exc:
      raise UserError(f"--guidance_interval={','.join(_INTERVAL.value)}: {exc}") from exc
    if len(interval) != 2:
      raise UserError(f"--guidance_interval={','.join(_INTERVAL.value)} needs two numbers lo,hi")
  options = generation.sampler_options(
      config, sampler=_SAMPLER.value, num_steps=_STEPS.value, spacing=_SPACING.value, eta=_ETA.value,
      x0_clipping=_X0_CLIPPING.value, guidance_rescale=_RESCALE.value, guidance_interval=interval)
  options.validate(config.diffusion.num_timesteps)

  loaded = inference.load(_WORKDIR.value, _STEP.value)
  run = loaded.run
  requests = [r for r in rows for _ in range(_NUM_PER_PROMPT.value)]
  sample_fn = generation.make_sample_fn(run.model, run.schedule, options, run.autoencoder)
  scale = config.sampling.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value
  if run.conditioning.kind == "none":
    if _GUIDANCE.value not in (None, 1.0):
      logging.warning("--guidance_scale=%s ignored: an unconditional model samples without guidance.", scale)
    scale = 1.0
  negative = config.sampling.negative_prompt if _NEGATIVE.value is None else _NEGATIVE.value
  images = images_lib.to_uint8(inference.generate(run, sample_fn, loaded.params, requests, scale, _SEED.value,
                                                negative))
  fields = {}  # What each image was asked for: samples.npz holds `prompts` or `labels` [N].
  if run.conditioning.kind == "text":
    fields["prompts"] = np.asarray(requests)
  elif run.conditioning.kind == "class":
    fields["labels"] = np.asarray(requests, np.int64)
  paths.write_npz_atomic(out, dict(images=images, guidance_scale=np.float32(scale), seed=np.int64(_SEED.value),
                                   step=np.int64(loaded.step), **fields))
  num_rows = len(rows) if len(rows) > 1 else max(1, int(math.sqrt(len(images))))
  images_lib.save_grid(png, images, num_rows=num_rows)
  logging.info("Wrote %d samples of checkpoint step %d to %s and the grid (one row per %s) to %s",
               len(images), loaded.step, out, {"text": "prompt", "class": "label"}.get(run.conditioning.kind,
                                                                                   "row"), png)
  print(f"samples: {out}\ngrid: {png}")


if __name__ == "__main__":
  cli.run(main)
