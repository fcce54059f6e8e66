"""One training run per workdir: a lock file `<workdir>/.lock` that a second run on the same workdir refuses.

Two runs on one workdir overwrite each other's checkpoints, so `hold(workdir)` is taken before any
checkpoint is read or written and kept for the whole run:

    with workdir_lock.hold(workdir):
      ...  # train

The lock file is JSON: host, pid, pid_namespace, token (random, names this holder), start_time and
heartbeat_time (seconds since the epoch, `time.time()` of the holder). It is created with
O_CREAT | O_EXCL, which is atomic on local disks and on NFS-like shared file systems, so of two runs
that start together exactly one gets it. A daemon thread rewrites heartbeat_time every `heartbeat_s`.

A lock is stale (its run is gone) and is taken over, with a warning, when:
- it was written on this host, in this pid namespace, and its pid is not alive. The namespace is
  compared too because containers with host networking share the host name but not the pids;
- or, from any host, its heartbeat is older than `stale_after_s`. This covers other hosts, whose pids
  cannot be checked, and a pid that a new process has reused. Clocks of different hosts are compared,
  so keep `stale_after_s` well above their skew (and above `heartbeat_s`);
- or it cannot be parsed (its writer died between creating and writing it) and its mtime is more
  than UNWRITTEN_GRACE_S old. A younger unparseable file is a writer in progress: the lock is in use.

Taking over renames the stale file to a name of our own, checks that the renamed file is the one
judged stale (a run may have heartbeated or taken it meanwhile; then it is put back and the workdir
is in use), deletes it and creates ours with O_EXCL; if another run won that race, ours is refused.

With several processes (jax.distributed) only process 0 holds the lock; the outcome is broadcast so
that every process either goes on or raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import paths
from diffusion_jax.errors import UserError
from diffusion_jax.paths import describe_os_error

LOCK_NAME = ".lock"
# An unparseable lock younger than this may be a writer between its O_EXCL create and its write.
UNWRITTEN_GRACE_S = 10.0


def lock_path(workdir: paths.PathLike) -> str:
  return os.path.join(os.fspath(paths.resolve(workdir)), LOCK_NAME)


def read_holder(workdir: str) -> dict | None:
  """The lock's JSON fields, or None when there is no lock file or it cannot be parsed (yet)."""
  return _parse(_read(lock_path(workdir))[0])


def hold(workdir: paths.PathLike, *, stale_after_s: float = 600, heartbeat_s: float = 60
         ) -> "WorkdirLock | contextlib.nullcontext":
  """The context manager that holds `workdir`'s lock; `workdir` must exist. See the module docstring.

  A URL workdir (gs://) is not locked: object stores have no exclusive create or process IDs to judge
  staleness by; there the launcher (one job per workdir) keeps runs apart.
  """
  if not paths.is_local(paths.resolve(workdir)):
    logging.info("--workdir %s is not local: no workdir lock (run one training job per workdir).", workdir)
    return contextlib.nullcontext()
  return WorkdirLock(workdir, stale_after_s=stale_after_s, heartbeat_s=heartbeat_s)


class WorkdirLock:
  """Enter to take the lock (UserError if another live run holds it), exit to release it."""

  def __init__(self, workdir: paths.PathLike, *, stale_after_s: float = 600, heartbeat_s: float = 60):
    if heartbeat_s <= 0 or stale_after_s <= heartbeat_s:
      raise UserError(f"workdir lock: heartbeat_s={heartbeat_s} and stale_after_s={stale_after_s} must "
                      f"satisfy 0 < heartbeat_s < stale_after_s")
    self.workdir = os.fspath(paths.resolve(workdir))
    self.path = lock_path(workdir)
    self.token = secrets.token_hex(16)
    self._stale_after_s = stale_after_s
    self._heartbeat_s = heartbeat_s
    self._content = {}  # What we wrote to the lock file; the heartbeat rewrites its heartbeat_time.
    self._held = False
    self._mutex = threading.Lock()  # A heartbeat never rewrites the file after release deleted it.
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock on process 0; every process raises if that failed."""
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire_here()
      except Exception as exc:  # pylint: disable=broad-except  (re-raised below, after the broadcast)
        error = exc
    if jax.process_count() > 1:
      failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
      if failed and error is None:
        raise UserError(f"--workdir {self.workdir} is in use by another training run or could not be "
                        f"locked; see process 0's log")
    if error is not None:
      raise error

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock file if it still holds our token. Idempotent."""
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()
    with self._mutex:
      if not self._held:
        return
      self._held = False
      raw, _ = _read(self.path)
      holder = _parse(raw)
      if holder is not None and holder.get("token") == self.token:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(self.path)
      else:
        logging.warning("Workdir lock %s is no longer ours (now %s); leaving it in place.",
                        self.path, _describe(holder))

  # Taking the lock.

  def _acquire_here(self) -> None:
    if not os.path.isdir(self.workdir):
      raise UserError(f"--workdir {self.workdir} does not exist; create it before locking it")
    if self._held:
      raise UserError(f"workdir lock {self.path} is already held by this WorkdirLock; release it first")
    if not self._create():
      raw, mtime = _read(self.path)
      if raw is not None:
        reason = self._stale_reason(raw, mtime)
        if reason is None:
          raise self._in_use_error(raw, mtime)
        self._take_over(raw, reason)
      if not self._create():  # Another run took it between our read and our create.
        raise self._in_use_error(*_read(self.path))
    self._held = True
    self._stop.clear()
    self._thread = threading.Thread(target=self._heartbeat_loop, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def _create(self) -> bool:
    """Creates the lock file with our content; False if a lock file exists."""
    now = time.time()
    content = {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
               "token": self.token, "start_time": now, "heartbeat_time": now}
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    except OSError as exc:
      raise UserError(f"cannot create the lock file {self.path} ({describe_os_error(exc)}); "
                      f"make --workdir writable") from exc
    try:
      os.write(fd, json.dumps(content).encode())
      os.fsync(fd)
    finally:
      os.close(fd)
    self._content = content
    # A taker that judged an earlier, empty file stale may have removed ours before we wrote it.
    holder = read_holder(self.workdir)
    if holder is None or holder.get("token") != self.token:
      raise self._in_use_error(*_read(self.path))
    return True

  def _stale_reason(self, raw: bytes, mtime: float) -> str | None:
    """Why the lock read as `raw` (file mtime `mtime`) belongs to a run that is gone; None if it may be live."""
    holder = _parse(raw)
    if holder is None:
      age = time.time() - mtime
      return f"unreadable for {age:.0f} s" if age > UNWRITTEN_GRACE_S else None
    if (holder["host"] == socket.gethostname() and holder.get("pid_namespace") == _pid_namespace()
        and not _pid_alive(holder["pid"])):
      return f"pid {holder['pid']} is not running"
    age = time.time() - holder["heartbeat_time"]
    if age > self._stale_after_s:
      return f"no heartbeat for {age:.0f} s (more than {self._stale_after_s:g} s)"
    return None

  def _take_over(self, raw: bytes, reason: str) -> None:
    """Removes the stale lock read as `raw`, unless it changed since; then raises the in-use error."""
    moved = f"{self.path}.stale.{self.token}"
    try:
      os.rename(self.path, moved)
    except FileNotFoundError:
      return  # Someone else removed it; _create decides who gets the workdir.
    moved_raw, moved_mtime = _read(moved)
    if moved_raw != raw:  # We moved a lock that is not the stale one: put it back.
      try:
        os.link(moved, self.path)  # Fails if a lock exists again; then the moved one has lost anyway.
      except OSError:
        pass
      os.unlink(moved)
      raise self._in_use_error(moved_raw, moved_mtime)
    os.unlink(moved)
    logging.warning("Taking over the stale lock of --workdir %s (%s): %s.", self.workdir,
                    _describe(_parse(raw)), reason)

  def _in_use_error(self, raw: bytes | None, mtime: float) -> UserError:
    holder = _parse(raw)
    if holder is None and raw is None:
      who = "a run that has just released it"
    else:
      who = _describe(holder) if holder is not None else f"lock file being written {time.time() - mtime:.0f} s ago"
    return UserError(f"--workdir {self.workdir} is in use by another training run ({who}); wait for it "
                     f"to finish or stop it, or use another --workdir. If that run is gone, delete {self.path}")

  # The heartbeat.

  def _heartbeat_loop(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      try:
        if not self._beat():
          return
      except OSError as exc:  # A shared file system's hiccup: try again next time.
        logging.warning("Could not update the heartbeat of %s: %s", self.path, describe_os_error(exc))

  def _beat(self) -> bool:
    """Rewrites heartbeat_time if the lock is still ours; False (after logging an error) if not."""
    with self._mutex:
      if not self._held or self._stop.is_set():
        return False
      holder = _parse(_read(self.path)[0])
      if holder is None or holder.get("token") != self.token:
        logging.error("Workdir lock %s was taken over or removed (now %s); another run may write to "
                      "--workdir %s. No more heartbeats.", self.path, _describe(holder), self.workdir)
        return False
      self._content["heartbeat_time"] = time.time()
      tmp = f"{self.path}.tmp.{self.token}"
      with open(tmp, "w") as f:
        json.dump(self._content, f)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
      return True


def _read(path: str) -> tuple[bytes | None, float]:
  """(content, mtime) of `path`, or (None, 0.0) if it does not exist."""
  try:
    with open(path, "rb") as f:
      return f.read(), os.fstat(f.fileno()).st_mtime
  except FileNotFoundError:
    return None, 0.0


def _parse(raw: bytes | None) -> dict | None:
  """The lock's fields, or None if `raw` is missing, partly written or not a lock."""
  if not raw:
    return None
  try:
    holder = json.loads(raw)
  except ValueError:
    return None
  if (not isinstance(holder, dict) or not isinstance(holder.get("host"), str)
      or not isinstance(holder.get("pid"), int) or holder["pid"] <= 0
      or not isinstance(holder.get("heartbeat_time"), (int, float))):
    return None
  return holder


def _describe(holder: dict | None) -> str:
  if holder is None:
    return "no readable lock"
  started = holder.get("start_time")
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  return (f"host {holder['host']}, pid {holder['pid']}, started {started}, "
          f"last heartbeat {max(0.0, time.time() - holder['heartbeat_time']):.0f} s ago")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by another user.
    return True
  return True


def _pid_namespace() -> str:
  """Which pid namespace this process is in ("" where /proc does not tell): pids compare only within one."""
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return ""
