"""Shared command-line plumbing: one-line errors for bad input instead of tracebacks."""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

from absl import app, flags, logging

from diffusion_jax.errors import UserError

_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)(=.*)?$")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _check_config_file(argv: list[str]) -> None:
  """A missing --config file is reported before absl turns it into a placeholder object."""
  path = _config_path(argv)
  if path is not None:
    file_part = path.split(":", 1)[0]
    if not os.path.isfile(file_part):
      _fail(f"config file {file_part!r} does not exist (from --config={path})")


def _unknown_override(argv: list[str], exc: Exception) -> str | None:
  """Names the `--config.key` that does not exist, if that is what `exc` is about."""
  text = str(exc)
  missing = re.search(r"'(\w+)", text)
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match and missing and missing.group(1) in match.group(1).split("."):
      hint = f' (did you mean "{suggestion.group(1)}"?)' if suggestion else ""
      return (f"unknown config key {match.group(1)!r} in {arg.split('=')[0]}{hint}; "
              f"diffusion_jax/config.py lists the keys")
  return None


def parse_flags(argv: list[str]) -> list[str]:
  _check_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as exc:
    _fail(_unknown_override(argv, exc) or f"bad flag: {exc}")
  except flags.Error as exc:
    _fail(str(exc))
  return []


class _QuietLibraries(logging.logging.Filter):
  """Keeps INFO lines of this package and clu's progress reports; libraries (orbax, grain…) only warn."""

  def filter(self, record) -> bool:
    return record.levelno >= logging.WARNING or any(
        part in record.pathname for part in ("diffusion_jax", "periodic_actions", "platform"))


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` where a UserError anywhere becomes `error: <message>` and exit code 2."""

  def wrapped(argv):
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
      main(argv)
    except UserError as exc:
      _fail(str(exc))

  app.run(wrapped, flags_parser=parse_flags)
