"""Sample: prompts → samples.npz (+ a PNG grid beside it).

python -m diffusion_jax.sample --workdir=runs/digits --prompts="a handwritten digit 3;the number seven" \
    --num_per_prompt=16 --guidance_scale=3 --sampler=ddim --steps=50 --seed=0 --out=samples.npz
"""

from __future__ import annotations

import math
import os

import numpy as np
from absl import flags, logging

from diffusion_jax import cli, inference, paths, sampling
from diffusion_jax import images as images_lib
from diffusion_jax.data.builders import digits
from diffusion_jax.diffusion import samplers
from diffusion_jax.errors import UserError
from diffusion_jax.models.tokenizer import ByteTokenizer

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Training workdir (config.json + checkpoints/) or exported directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a training workdir; default: the latest.")
_PROMPTS = flags.DEFINE_string("prompts", ";".join(digits.caption_for(d) for d in range(10)),
                               "';'-separated prompts.")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", 8, "Images per prompt.")
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


def output_paths(out: str) -> tuple[str, str]:
  """(samples .npz, PNG grid) for --out: an existing directory (or a path ending in '/') gets samples.npz
  inside, a path without the .npz suffix gets it appended (as np.savez would); absolute paths."""
  if not out:
    raise UserError("--out is empty; give a .npz path or a directory")
  if os.path.isdir(out) or out.endswith(os.sep):
    out = os.path.join(out, "samples.npz")
  elif not out.endswith(".npz"):
    out += ".npz"
  out = os.path.abspath(out)
  return out, out[:-len(".npz")] + ".png"


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  prompts = sampling.parse_prompts(_PROMPTS.value)
  if not prompts or _NUM_PER_PROMPT.value < 1:
    raise UserError("give at least one prompt (--prompts='a;b') and --num_per_prompt >= 1")
  if _GUIDANCE.value is not None and not math.isfinite(_GUIDANCE.value):
    raise UserError(f"--guidance_scale={_GUIDANCE.value} is not allowed; give a finite number (1 = no guidance)")
  # Fail on a bad workdir, an over-long prompt or an unwritable --out before loading or compiling anything.
  tokenizer = ByteTokenizer(inference.read_config(_WORKDIR.value).text.max_length)
  for p in prompts + [_NEGATIVE.value or ""]:
    tokenizer.encode(p)
  out, png = output_paths(_OUT.value)
  paths.ensure_writable_dir(os.path.dirname(out), "--out directory")
  loaded = inference.load(_WORKDIR.value, _STEP.value)
  all_prompts = [p for p in prompts for _ in range(_NUM_PER_PROMPT.value)]
  interval = None
  if _INTERVAL.value is not None:
    try:
      interval = tuple(float(v) for v in _INTERVAL.value)
    except ValueError as exc:
      raise UserError(f"--guidance_interval={','.join(_INTERVAL.value)}: {exc}") from exc
    if len(interval) != 2:
      raise UserError(f"--guidance_interval={','.join(_INTERVAL.value)} needs two numbers lo,hi")
  options = sampling.sampler_options(
      loaded.config, sampler=_SAMPLER.value, num_steps=_STEPS.value, spacing=_SPACING.value, eta=_ETA.value,
      x0_clipping=_X0_CLIPPING.value, guidance_rescale=_RESCALE.value, guidance_interval=interval)
  sample_fn = sampling.make_sample_fn(loaded.model, loaded.schedule, options)
  scale = loaded.config.sampling.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value
  negative = loaded.config.sampling.negative_prompt if _NEGATIVE.value is None else _NEGATIVE.value
  images = images_lib.to_uint8(sampling.generate(sample_fn, loaded.params, loaded.tokenizer, all_prompts,
                                                 scale, _SEED.value, negative))
  np.savez(out, images=images, prompts=np.asarray(all_prompts), guidance_scale=np.float32(scale),
           seed=np.int64(_SEED.value), step=np.int64(loaded.step))
  images_lib.save_png(png, images_lib.make_grid(images, num_rows=len(prompts), upscale=4))
  logging.info("Wrote %d samples of checkpoint step %d to %s and the grid (one row per prompt) to %s",
               len(images), loaded.step, out, png)
  print(f"samples: {out}\ngrid: {png}")


if __name__ == "__main__":
  cli.run(main)
