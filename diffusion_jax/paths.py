"""The path layer: every file a run reads or writes under a workdir goes through here.

A path is a local path or a URL. URLs (`gs://bucket/run`, any scheme etils `epath` knows, as orbax
uses) are handled by `epath`, so a Cloud Storage workdir works end to end: checkpoints (orbax takes
the same path), config.json, metrics, TensorBoard events, sample PNGs, evaluation records, exports.
Writes are atomic either way: a local file is written to a temporary file and renamed over the
target; an object store publishes an object only when its upload completes.

For tests, `$DIFFUSION_JAX_URL_FAKES` ("scheme=DIR[,scheme=DIR]") maps URLs of a made-up scheme onto a
local directory (`fake://bucket/run` → DIR/bucket/run), so a test can run a job on a URL workdir and find
every file it wrote there, and none anywhere else.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
import uuid
from typing import Union

import numpy as np
from etils import epath

from diffusion_jax.errors import UserError

PathLike = Union[str, os.PathLike]
FAKES_ENV = "DIFFUSION_JAX_URL_FAKES"
CACHE_ENV = "DIFFUSION_JAX_CACHE_DIR"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "diffusion_jax")


def cache_dir(path: str = "") -> str:
  """`path`, else $DIFFUSION_JAX_CACHE_DIR, else ~/.cache/diffusion_jax: this machine's caches (feature
  networks, reference statistics, compiled programs)."""
  return os.path.abspath(os.path.expanduser(path or os.environ.get(CACHE_ENV, "") or DEFAULT_CACHE_DIR))


def is_url(path: PathLike) -> bool:
  """True for 'scheme://…' (gs://, s3://, a test's fake scheme), False for local paths."""
  return "://" in os.fspath(path)


def _fakes() -> dict[str, str]:
  """{scheme: local root} from $DIFFUSION_JAX_URL_FAKES."""
  pairs = [item.split("=", 1) for item in os.environ.get(FAKES_ENV, "").split(",") if "=" in item]
  return {scheme.strip(): os.path.abspath(root) for scheme, root in pairs}


def resolve(path: PathLike) -> epath.Path:
  """The location of `path`: an absolute local path, or the URL as an epath (a fake scheme's URL maps
  under its local root). Accepts an epath.Path already resolved."""
  text = os.fspath(path)
  if is_url(text):
    scheme, rest = text.split("://", 1)
    root = _fakes().get(scheme)
    return epath.Path(root) / rest if root else epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_local(path: epath.Path) -> bool:
  """True when `path` (resolved) is on a local file system, where rename is atomic."""
  return not is_url(path)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` (parents created): readers and concurrent writers see the old file or the
  whole new one, never part of one. Locally: a unique temporary file beside it, flushed to disk, renamed
  over it, with ordinary permissions (umask); on an object store: one object upload."""
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(path):
    path.write_bytes(data)
    return
  fd, tmp = tempfile.mkstemp(dir=os.fspath(path.parent), prefix=".tmp-" + path.name + "-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private (0600).
    os.replace(tmp, os.fspath(path))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(path: PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


def write_npz_atomic(path: PathLike, arrays: dict) -> None:
  """Writes `arrays` ({name: array}) as the .npz `path`, atomically (see `write_bytes_atomic`)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes_atomic(path, buffer.getvalue())


def move_tree(source: PathLike, target: PathLike) -> None:
  """Moves the directory `source` to `target` (a rename locally; copy, then delete, on object stores,
  which have no directories to rename)."""
  source, target = resolve(source), resolve(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_local(source) and is_local(target):
    shutil.move(os.fspath(source), os.fspath(target))
    return
  for directory, _, files in source.walk():  # (rglob would be one listing per pattern level on GCS.)
    for name in files:
      file = directory / name
      destination = target / file.relative_to(source)
      destination.parent.mkdir(parents=True, exist_ok=True)
      file.copy(destination, overwrite=True)
  source.rmtree()


def ensure_writable_dir(path: PathLike, what: str) -> epath.Path:
  """Creates `path` if needed and proves a file can be written there; returns it resolved.

  Raises UserError naming `what` (e.g. "--workdir"), the path and the reason (read-only file
  system, permission denied, no space left, a file in the way, no access to a bucket). The probe is a
  real write, so it also holds for root, for whom permission bits do not apply, on a read-only mount.
  """
  resolved = resolve(path)
  try:
    if resolved.exists() and not resolved.is_dir():
      raise UserError(f"{what} {os.fspath(path)!r} exists and is not a directory")
    resolved.mkdir(parents=True, exist_ok=True)
    probe = resolved / f".write_probe_{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    probe.unlink()
  except UserError:
    raise
  except Exception as exc:  # pylint: disable=broad-except  (OSError locally; the storage client's errors for URLs)
    reason = describe_os_error(exc) if isinstance(exc, OSError) else " ".join(str(exc).split())[:200]
    raise UserError(f"{what} {os.fspath(path)!r} is not writable ({reason}); choose a writable directory "
                    f"or fix its permissions, credentials or free space") from exc
  return resolved


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
