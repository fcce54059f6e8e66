"""Export the EMA parameters of a training run for sampling and evaluation.

python -m diffusion_jax.export --workdir=runs/digits [--step=N] --out=runs/digits/export

The exported directory holds config.json, params/ (orbax) and export.json; `sample` and `evaluate`
take it as --workdir. It is a fraction of a checkpoint's size: no optimizer state, no raw params.
"""

from __future__ import annotations

import os

from absl import flags, logging

from diffusion_jax import cli, inference, paths
from diffusion_jax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to export from.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the export to (must not hold one yet).")
flags.mark_flags_as_required(["workdir", "out"])


def _canonical(path: str) -> str:
  """A comparable form: symlinks resolved for local paths, the URL without a trailing '/' otherwise."""
  resolved = paths.resolve(path)
  return os.path.realpath(resolved) if paths.is_local(resolved) else str(resolved).rstrip("/")


def check_out(workdir: str, out: str) -> None:
  """Refuses an --out that would write into the training run: the workdir itself, its checkpoints/ (or a
  directory inside it), or another training workdir. A new subdirectory such as <workdir>/export is fine."""
  source, target = _canonical(workdir), _canonical(out)
  checkpoints = source + "/checkpoints"
  suggestion = workdir.rstrip("/") + "/export"
  if target == source:
    raise UserError(f"--out={out!r} is the training workdir itself; export to another directory, "
                    f"e.g. --out={suggestion}")
  if target == checkpoints or target.startswith(checkpoints + "/"):
    raise UserError(f"--out={out!r} writes into the checkpoints directory {checkpoints!r}; export to another "
                    f"directory, e.g. --out={suggestion}")
  resolved = paths.resolve(out)
  if (resolved / "config.json").is_file() and (resolved / "checkpoints").is_dir():
    raise UserError(f"--out={out!r} is a training workdir (config.json + checkpoints/); export to another "
                    f"directory")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  if inference.is_export(_WORKDIR.value):
    raise UserError(f"{_WORKDIR.value!r} is already an export; pass a training workdir")
  check_out(_WORKDIR.value, _OUT.value)
  out = inference.export(_WORKDIR.value, _OUT.value, _STEP.value)
  logging.info("Exported the EMA parameters to %s", out)
  print(f"export: {out}")


if __name__ == "__main__":
  cli.run(main)
