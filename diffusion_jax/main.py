"""Train: python -m diffusion_jax.main --config=configs/digits.py --workdir=runs/digits [--config.key=value]."""

from diffusion_jax import host_memory

if __name__ == "__main__":
  host_memory.use_huge_pages()  # Re-executes this command with huge pages for XLA's buffers, before JAX loads.

# pylint: disable=wrong-import-position  (the imports below load JAX)
from absl import flags
from ml_collections import config_flags

from diffusion_jax import cli
from diffusion_jax.errors import UserError
from diffusion_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  distributed.initialize()
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top  (after jax.distributed)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
