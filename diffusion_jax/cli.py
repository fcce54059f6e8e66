"""Shared command-line plumbing: one-line errors for bad input instead of tracebacks."""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Callable

from absl import app, flags, logging

from diffusion_jax import paths
from diffusion_jax.errors import Interrupted, UserError
from diffusion_jax.preemption import EXIT_CODE_INTERRUPTED

# TensorFlow (imported by TFDS and clu) prints C++ INFO lines such as oneDNN notices before absl's
# logging is set up; warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)(=.*)?$")

_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", None, "JAX's persistent compilation cache, so a restarted, resumed or repeated "
    "job does not compile again (default: $JAX_COMPILATION_CACHE_DIR, else <cache dir>/jax_compilation_cache "
    "with the cache dir of $DIFFUSION_JAX_CACHE_DIR or ~/.cache/diffusion_jax); an empty value turns it off.")


def enable_compilation_cache(directory: str | None) -> str | None:
  """Points JAX's persistent compilation cache at `directory` (None: the default above; '': off).
  Returns the directory used, or None when off. Programs that compile in under a second are not kept."""
  import jax  # pylint: disable=g-import-not-at-top  (the launchers do not need JAX)
  if directory is None:
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(paths.cache_dir(), "jax_compilation_cache")
  if not directory:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


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


def _config_file_error(argv: list[str], exc: BaseException) -> str | None:
  """'config file F, line N: SyntaxError: …' when `exc` comes from executing the --config file itself."""
  path = _config_path(argv)
  if path is None:
    return None
  file_part = os.path.realpath(path.split(":", 1)[0])
  if isinstance(exc, SyntaxError) and exc.filename and os.path.realpath(exc.filename) == file_part:
    return f"config file {path.split(':', 1)[0]!r}, line {exc.lineno}: SyntaxError: {exc.msg}"
  frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.realpath(f.filename) == file_part]
  if frames:
    frame = frames[-1]
    return (f"config file {path.split(':', 1)[0]!r}, line {frame.lineno} (in {frame.name}): "
            f"{type(exc).__name__}: {exc}")
  return None


def parse_flags(argv: list[str]) -> list[str]:
  _check_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as exc:
    _fail(_config_file_error(argv, exc) or str(exc))
  except Exception as exc:  # pylint: disable=broad-except  (executing the config file can raise anything)
    message = _config_file_error(argv, exc)
    if message is None and isinstance(exc, (AttributeError, KeyError)):
      message = _unknown_override(argv, exc) or f"bad flag: {exc}"
    if message is None:
      raise
    _fail(message)
  return []


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# clu's modules whose INFO lines are the training log: progress with rate and ETA, and metric values.
_CLU_PROGRESS = (os.path.join("clu", "periodic_actions.py"), os.path.join("clu", "platform"),
                 os.path.join("clu", "metric_writers", "logging_writer.py"))


class _QuietLibraries(logging.logging.Filter):
  """Keeps INFO lines of this package and clu's progress reports; libraries (orbax, grain, TFDS…) only warn.

  Orbax alone logs about 150 INFO lines per checkpoint-saving run, which drowned the training log.
  Matched by the source file, since every library logs through absl's one logger.
  """

  def filter(self, record) -> bool:
    message = str(record.getMessage())
    if record.name == "asyncio" and "never retrieved" in message and ("orbax" in message or "TensorStore" in message):
      # The reads a failed restore of a damaged checkpoint abandoned, collected at exit; that failure
      # was already reported in one line (see checkpoint.Checkpointer.attempt_restore).
      return False
    path = os.path.abspath(record.pathname)
    # absl.logging.WARNING is absl's verbosity (-1), not the record level: compare with the stdlib's.
    return (record.levelno >= logging.logging.WARNING or path.startswith(_PACKAGE_DIR)
            or any(part in path for part in _CLU_PROGRESS))


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` where a UserError anywhere becomes `error: <message>` and exit code 2."""

  def wrapped(argv):
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
      enable_compilation_cache(_COMPILATION_CACHE.value)
      main(argv)
    except UserError as exc:
      _fail(str(exc))
    except Interrupted as exc:
      print(f"interrupted: {exc}", file=sys.stderr)
      sys.exit(EXIT_CODE_INTERRUPTED)
    except KeyboardInterrupt:  # Ctrl-C outside training (sampling, evaluation): nothing to save.
      print("interrupted", file=sys.stderr)
      sys.exit(EXIT_CODE_INTERRUPTED)

  app.run(wrapped, flags_parser=parse_flags)
