"""What every launcher shares: the `--config` / `--workdir` / `--dry_run` flags, the training command, and
running commands (or, with `--dry_run`, printing them shell-quoted, one per line, and running nothing).

The launchers define `--config` as a config file flag, like `diffusion_jax.main`, so a mistyped
`--config.KEY=VALUE` override is a one-line error here, before any process, TPU or job is started; the
overrides are then passed on verbatim.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

from diffusion_jax import paths
from diffusion_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (checkpoints, metrics, samples).")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands, shell-quoted, one per line, and run nothing.")
PROBE_WORKDIR = flags.DEFINE_bool(
    "probe_workdir", True, "Prove --workdir writable from this machine before starting anything (a gs:// "
    "workdir needs this machine's GCS credentials). Skipped by --dry_run.")

# Config overrides as config_flags recognises them: --config.a.b=1, --config.a.b 1, --noconfig.flag.
_OVERRIDE = re.compile(r"^--?(no)?config\.")


def config_path() -> str:
  """The --config argument as given (a path, possibly with config_flags' `:arg` suffix); UserError if absent."""
  if CONFIG.value is None:
    raise UserError("--config is required, e.g. --config=configs/digits.py")
  return config_flags.get_config_filename(flags.FLAGS["config"])


def workdir() -> str:
  if not WORKDIR.value:
    raise UserError("--workdir is required (where checkpoints go; the run resumes from them)")
  return WORKDIR.value


def config_overrides(argv: list[str]) -> list[str]:
  """The `--config.KEY=VALUE` overrides of `argv` (the raw command line), in order, one argument each.

  absl has already parsed and type-checked them; this only carries them on. `--config.KEY VALUE`
  (two arguments) becomes `--config.KEY=VALUE`; boolean forms (`--config.flag`, `--noconfig.flag`) stay.
  """
  out = []
  args = iter(argv)
  for arg in args:
    if not _OVERRIDE.match(arg):
      continue
    name = arg.lstrip("-").split("=", 1)[0]
    if "=" in arg or name not in flags.FLAGS or flags.FLAGS[name].boolean:
      out.append(arg)
    else:
      out.append(f"{arg}={next(args)}")
  return out


def train_argv(config: str, workdir_: str, overrides: list[str], python: str = sys.executable) -> list[str]:
  """The training command: `python -m diffusion_jax.main --config=… --workdir=… [overrides]`."""
  return [python, "-m", "diffusion_jax.main", f"--config={config}", f"--workdir={workdir_}", *overrides]


def check_workdir(path: str) -> None:
  """UserError if `path` cannot be written (a file in the way, permissions, read-only, full), unless
  --noprobe_workdir or --dry_run. Creates the directory, like the trainer would."""
  if PROBE_WORKDIR.value and not DRY_RUN.value:
    paths.ensure_writable_dir(path, "--workdir")


def require_program(name: str, hint: str) -> None:
  """UserError unless `name` is on PATH (not needed with --dry_run, which runs nothing)."""
  if not DRY_RUN.value and shutil.which(name) is None:
    raise UserError(f"{name} not found on PATH: {hint}, or use --dry_run to print the commands")


class Commands:
  """Runs commands one after another, echoing each to stderr as `+ cmd`; with dry_run prints each to
  stdout instead (shell-quoted, one per line) and runs nothing."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def note(self, text: str) -> None:
    """A step that is not a command (packing files here, a state check): a `#` comment line."""
    print(f"# {text}", file=sys.stdout if self.dry_run else sys.stderr, flush=True)

  def call(self, argv: list[str]) -> int:
    """Runs `argv` with this terminal's stdin/stdout/stderr; returns its exit status (0 in a dry run)."""
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return 0
    print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
    return subprocess.call(argv)

  def check(self, argv: list[str]) -> None:
    """`call`, and UserError if the command fails (its own message is already on the terminal)."""
    status = self.call(argv)
    if status:
      raise UserError(f"`{shlex.join(argv[:6])} …` exited with status {status} (its output is above)")
