"""Checks on the directories a job writes to, made before any work whose result would be lost."""

from __future__ import annotations

import errno
import os
import tempfile

import numpy as np

from diffusion_jax.errors import UserError


def ensure_writable_dir(path: str, what: str) -> str:
  """Creates `path` if needed and proves a file can be written there; returns its absolute path.

  Raises UserError naming `what` (e.g. "--workdir"), the path and the reason (read-only file
  system, permission denied, no space left, a file in the way). The probe is a real write, so it
  also holds for root, for whom permission bits do not apply, on a read-only mount.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{what} {path!r} exists and is not a directory")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe_"):
      pass
  except OSError as exc:
    raise UserError(f"{what} {path!r} is not writable ({describe_os_error(exc)}); "
                    f"choose a writable directory or fix its permissions or free space") from exc
  return path


def write_npz_atomic(path: str, arrays: dict) -> None:
  """Writes `arrays` ({name: array}) as the .npz `path`: a unique temporary file in the same directory
  (created if needed), flushed to disk, then renamed over `path`, so readers and concurrent writers see
  the old file or the whole new one, never part of one. The file gets ordinary permissions (umask)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path) + "-", suffix=".npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private (0600).
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def describe_os_error(exc: OSError) -> str:
  """'No space left on device' etc.: the OS's message for the error number, without the traceback."""
  if exc.errno is not None:
    return os.strerror(exc.errno)
  return str(exc)


def is_disk_full(exc: BaseException) -> bool:
  """True if `exc` or any exception it was raised from is ENOSPC (or its message says so)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(exc):
      return True
    exc = exc.__cause__ or exc.__context__
  return False
