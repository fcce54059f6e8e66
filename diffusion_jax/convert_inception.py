"""Convert pytorch-fid's Inception weights to the .npz that the FID and Inception Score metrics load.

python -m diffusion_jax.convert_inception --weights=pt_inception-2015-12-05-6726825d.pth --out=fid_inception.npz

The .pth is read without torch, converted to FIDInceptionV3's Flax variables, checked key by key and shape by
shape, and written atomically. (The metrics also take the .pth directly; the .npz skips the conversion.)
"""

from __future__ import annotations

import os

from absl import flags, logging

from diffusion_jax import cli
from diffusion_jax.errors import UserError
from diffusion_jax.metrics import inception

_WEIGHTS = flags.DEFINE_string("weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or an .npz).")
_OUT = flags.DEFINE_string("out", None, "The .npz to write (replaced if it exists).")
flags.mark_flags_as_required(["weights", "out"])


def convert(weights: str, out: str) -> int:
  """Reads `weights`, checks them against FIDInceptionV3 and writes them to `out`; returns the parameter count."""
  if os.path.isdir(out):
    raise UserError(f"--out={out!r} is a directory; pass a file name such as {os.path.join(out, 'fid_inception.npz')}")
  directory = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(directory):
    raise UserError(f"--out={out!r}: directory {directory!r} does not exist")
  variables = inception.load_variables(weights)
  inception.save_variables(out, variables)
  return inception.num_parameters(variables)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  count = convert(_WEIGHTS.value, _OUT.value)
  logging.info("Converted %s to %s", _WEIGHTS.value, _OUT.value)
  print(f"inception weights: {_OUT.value} ({count:,} parameters)")


if __name__ == "__main__":
  cli.run(main)
