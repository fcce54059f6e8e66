"""Orbax checkpoints of a run: `workdir/checkpoints/<step>/{state, data, config, integrity}`.

- `state`: the TrainState (params, EMA, optimizer state, step, RNG, non-finite counters);
- `data`: the grain iterator position of every process;
- `config`: the resolved config;
- `integrity`: a fingerprint of `state`, checked on restore, so a checkpoint whose files were
  damaged after they were written is detected even when its bytes still decode.

Saves are asynchronous. Orbax writes each step to a temporary directory and renames it only when
complete, and removes checkpoints beyond `max_to_keep` only after the new one is committed: an
interrupted save never costs the previous good checkpoint. A checkpoint that fails to restore is
moved to `workdir/checkpoints_damaged/` and the previous one is used instead, with a warning.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import paths
from diffusion_jax.errors import NonFiniteError, UserError

# Metrics that can rank checkpoints for `keep_best_checkpoints`, and whether lower is better.
BEST_METRICS = {"eval_loss": "min"}


def checkpoint_dir(workdir: paths.PathLike) -> paths.epath.Path:
  """<workdir>/checkpoints, local or at a URL (orbax reads and writes gs:// itself)."""
  return paths.resolve(workdir) / "checkpoints"


def _bits_sum(array: np.ndarray) -> int:
  """The bits of `array` summed as unsigned integers of its item size, modulo 2^32."""
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[array.dtype.itemsize]
  return int(np.ascontiguousarray(array).view(unsigned).sum(dtype=np.uint64)) % 2**32


def _local_shards(leaf: Any) -> list[np.ndarray]:
  """The distinct shards of `leaf` that this process holds (replica 0 of each), as numpy arrays."""
  if isinstance(leaf, jax.Array):
    return [np.asarray(shard.data) for shard in leaf.addressable_shards if shard.replica_id == 0]
  return [np.asarray(leaf)]


def _top_level_name(path: tuple[Any, ...]) -> str:
  """'ema_params' for the path of a leaf of state.ema_params (an attribute or a dict key)."""
  key = path[0] if path else None
  return str(getattr(key, "name", getattr(key, "key", "")))


def _leaf_stats(tree: Any) -> tuple[list[tuple[Any, ...]], np.ndarray, np.ndarray]:
  """(leaf paths, bit sums uint64 [L] modulo 2^32, non-finite flags bool [L]) over all processes."""
  with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums, nonfinite = [], []
  for _, leaf in with_paths:
    shards = _local_shards(leaf)
    sums.append(sum(_bits_sum(s) for s in shards) % 2**32)
    nonfinite.append(any(np.issubdtype(s.dtype, np.inexact) and not np.isfinite(s).all() for s in shards))
  sums, nonfinite = np.asarray(sums, np.uint64), np.asarray(nonfinite, bool)
  if jax.process_count() > 1:
    sums = np.sum(multihost_utils.process_allgather(sums.astype(np.uint32)), axis=0, dtype=np.uint64) % 2**32
    nonfinite = np.any(multihost_utils.process_allgather(nonfinite), axis=0)
  return [p for p, _ in with_paths], sums, nonfinite


def _on_any_process(flag: bool) -> bool:
  """True if `flag` is True on any process (a collective: every process must call it at the same point)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _combine(sums: np.ndarray) -> int:
  return sum((i + 1) * int(s) for i, s in enumerate(sums)) % 2**32


def fingerprint(tree: Any) -> int:
  """A 32-bit checksum of every bit of every leaf, independent of how the leaves are sharded.

  Each leaf's bits are summed modulo 2^32, so the order of the sum (and the layout of the shards) does
  not matter; leaf sums are combined with position weights, so swapping two leaves changes it too.
  Computed on the host from the shards each process holds (no device program: dispatching many small
  collective programs can deadlock simulated CPU devices), then summed over processes.
  """
  return _combine(_leaf_stats(tree)[1])


# Subtrees of the TrainState with a fingerprint of their own, so that restoring one of them alone (the
# EMA parameters, for sampling) can be verified without reading the rest.
FINGERPRINTED_SUBTREES = ("params", "ema_params")
# Subtrees that must be finite: a checkpoint with NaN or inf parameters is never written.
MUST_BE_FINITE = ("params", "ema_params", "opt_state")


def integrity_record(state: Any) -> dict[str, Any]:
  """{'state_fingerprint', 'subtree_fingerprints': {name: int}} of a TrainState, from one pass over it.

  Raises NonFiniteError if a parameter, EMA or optimizer leaf holds NaN or inf.
  """
  paths, sums, nonfinite = _leaf_stats(state)
  names = [_top_level_name(p) for p in paths]
  bad = [jax.tree_util.keystr(p) for p, n, bad in zip(paths, names, nonfinite) if bad and n in MUST_BE_FINITE]
  if bad:
    step = getattr(state, "step", None)
    at = f" at step {int(jax.device_get(step))}" if step is not None else ""
    raise NonFiniteError(f"the train state{at} holds non-finite values "
                         f"in {len(bad)} leaves ({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''}); "
                         f"it is not saved, and the last checkpoint is left as it was")
  subtrees = {name: _combine(sums[[n == name for n in names]]) for name in FINGERPRINTED_SUBTREES}
  return {"state_fingerprint": _combine(sums), "subtree_fingerprints": subtrees}


# What orbax/tensorstore print to stderr after a restore that failed on damaged bytes: the reads still in
# flight complete into the event loop orbax already closed ("Event loop is closed", "Exception ignored in
# <coroutine …>"), hundreds of traceback lines that bury the one message that matters.
_TEARDOWN_SETTLE_S = 0.5


@contextlib.contextmanager
def _quiet_failed_restore_teardown():
  """Routes file descriptor 2 to a temporary file while restores are attempted; afterwards writes back
  only the log lines (absl's `[IWEF]mmdd …` format) and one line counting what was left out."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode("utf-8", errors="replace").splitlines()
      kept = [l for l in lines if re.match(r"^[IWEF]\d{4} ", l)]
      for line in kept:
        print(line, file=sys.stderr)
      if len(lines) > len(kept):
        logging.warning("Left out %d lines that orbax/tensorstore printed while tearing down the failed "
                        "restore (asyncio 'Event loop is closed' tracebacks).", len(lines) - len(kept))


def _ignore_abandoned_reads() -> None:
  """The read coroutines that a failed restore abandoned raise once more when they are garbage collected
  (at exit: "Exception ignored in: <coroutine … _read_array_index_and_device_put>", with a TensorStore
  spec of 60 lines each). The failure was already reported; this keeps only those quiet."""
  previous = sys.unraisablehook
  if getattr(previous, "_ignores_abandoned_reads", False):
    return

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and os.sep + "orbax" + os.sep in code.co_filename:
      return
    previous(unraisable)

  hook._ignores_abandoned_reads = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


class Checkpointer:
  """Saves and restores a run's state, data-iterator position and config.

  max_to_keep: the latest checkpoints kept. keep_best (with best_metric): also keep this many
  checkpoints with the best `metrics[best_metric]` passed to `save`.
  """

  def __init__(self, workdir: paths.PathLike, *, max_to_keep: int | None = None, keep_best: int = 0,
               best_metric: str = "eval_loss", read_only: bool = False):
    self.workdir = paths.resolve(workdir)
    self._saving_step = None  # The step of the latest save started, committed or not.
    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=BEST_METRICS[best_metric] == "min",
          n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only, enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only,  # What a save killed half-way left behind.
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
    try:
      self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                           item_names=("state", "data", "config", "integrity"))
    except OSError as exc:
      raise UserError(f"cannot read checkpoints in {str(checkpoint_dir(workdir))!r}: {exc}") from exc

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, config_dict: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save; `wait()` blocks until it is on disk, `check_for_errors()` polls.

    Raises NonFiniteError (and writes nothing) if the parameters, EMA or optimizer state hold NaN or
    inf: such a checkpoint could only replace a good one with garbage.
    """
    self.check_for_errors()
    integrity = integrity_record(state)
    self._saving_step = step
    with self._disk_full_as_user_error():
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          config=ocp.args.JsonSave(config_dict),
          integrity=ocp.args.JsonSave(integrity)), metrics=metrics, force=True)

  def check_for_errors(self) -> None:
    """Raises now if the last asynchronous save has failed: UserError for a full disk, else its error.

    Orbax's own finalize thread takes a failed background save's error from
    `CheckpointManager.check_for_errors`, which then never sees it, and keeps it for the next save or
    wait; so once no save is in progress this waits, which returns at once or raises that error. The
    training loop calls this after steps, so a full disk stops the run at the first step after the save
    failed instead of at the next save. With several processes each sees its save end at its own step,
    and one process stopping while the others enter the next step's collectives would hang them: the
    processes agree first (a host round trip, so the loop polls less often there).
    """
    error = None
    if not self.manager.is_saving_in_progress():
      try:
        self.wait()
      except Exception as exc:  # pylint: disable=broad-except  (raised below, on every process)
        error = exc
    if _on_any_process(error is not None) and error is None:
      raise UserError(f"saving a checkpoint to {self.directory} failed on another process (its log says "
                      f"why); stopping on every process. Fix that and rerun the same command to resume")
    if error is not None:
      raise error

  def wait(self) -> None:
    with self._disk_full_as_user_error():
      self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _disk_full_as_user_error(self):
    """ENOSPC from a save (now or in the background) becomes one line; any other error passes as is."""
    try:
      yield
    except Exception as exc:  # pylint: disable=broad-except  (re-raised unless it is ENOSPC)
      if not paths.is_disk_full(exc):
        raise
      good = [s for s in self.all_steps() if s != self._saving_step]
      kept = f"the last complete checkpoint (step {max(good)}) is kept" if good else "no checkpoint was complete yet"
      raise UserError(f"No space left on device while saving a checkpoint to {self.directory}; the save was "
                      f"abandoned and {kept}. Free space there and rerun the same command to resume") from exc

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    """The state at `step` (sharded as `abstract_state` says); restores `data_iterator` in place.

    Raises UserError for a step that does not exist, and ValueError when the files do not restore
    to a state with the saved fingerprint.
    """
    self.check_step(step)
    items = {"state": ocp.args.PyTreeRestore(
                 abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
             "integrity": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = restored["state"]
    expected, actual = restored["integrity"]["state_fingerprint"], fingerprint(state)
    if expected != actual:
      raise ValueError(f"the restored state's fingerprint {actual} differs from the saved {expected}")
    logging.info("Restored checkpoint at step %d from %s", step, self.directory)
    return state

  def restore_subtree(self, step: int, name: str, abstract_state: Any) -> Any:
    """Only `state.<name>` (e.g. the EMA parameters) of the checkpoint at `step`, verified.

    `abstract_state` is the whole TrainState's abstract structure. Checkpoints record a fingerprint of
    each subtree in FINGERPRINTED_SUBTREES: then only that subtree is read (orbax partial restore) and
    checked against it. Older checkpoints without one are restored whole and checked as a whole.
    Raises ValueError when the files do not restore to the saved fingerprint.
    """
    self.check_step(step)
    integrity = self.manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))["integrity"]
    expected = integrity.get("subtree_fingerprints", {}).get(name)
    if expected is None:
      return getattr(self.restore(step, abstract_state), name)
    abstract = {name: getattr(abstract_state, name)}
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True)))
    subtree = restored["state"][name]
    actual = fingerprint(subtree)
    if actual != expected:
      raise ValueError(f"the restored {name} fingerprint {actual} differs from the saved {expected}")
    return subtree

  def restore_latest_good(self, restore_fn: Callable[[int], Any], *, move_damaged: bool = True
                          ) -> tuple[int | None, Any]:
    """`(step, restore_fn(step))` for the newest checkpoint that restores; (None, None) if there is none.

    A checkpoint that fails (truncated or corrupted files, a fingerprint that does not match) is moved
    to `checkpoints_damaged/` with a warning (or, with move_damaged=False, for readers such as `sample`
    that must not change a workdir, only skipped), and the one before it is tried. All processes agree
    on the outcome of every attempt.
    """
    self.refuse_if_only_damaged_remain()
    damaged = []
    for step in reversed(self.all_steps()):
      result, error = self.attempt_restore(restore_fn, step)
      if not _on_any_process(error is not None):
        return step, result
      reason = (f"{type(error).__name__}: {' '.join(str(error).split())[:300]}" if error
                else "failed on another process")
      if move_damaged:
        logging.warning("Checkpoint step %d in %s cannot be restored (%s); moving it to %s and falling back "
                        "to the previous checkpoint.", step, self.directory, reason, self._damaged_dir())
        self._move_aside(step)
      else:
        logging.warning("Checkpoint step %d in %s cannot be restored (%s); trying the previous checkpoint.",
                        step, self.directory, reason)
      damaged.append(step)
    if damaged:  # Starting over silently would look like lost work.
      where = f"were moved to {self._damaged_dir()}" if move_damaged else "are left where they are"
      raise UserError(f"no checkpoint in {self.directory} could be restored (steps {damaged} are damaged and "
                      f"{where}); delete the workdir to start over")
    return None, None

  @staticmethod
  def attempt_restore(restore_fn: Callable[[int], Any], step: int) -> tuple[Any, Exception | None]:
    """(restore_fn(step), None), or (None, the exception) if it failed; a failure on damaged bytes does
    not flood stderr with the asynchronous teardown noise of the reads that were still in flight."""
    with _quiet_failed_restore_teardown():
      try:
        return restore_fn(step), None
      except Exception as exc:  # pylint: disable=broad-except  (any failure means: do not use it)
        time.sleep(_TEARDOWN_SETTLE_S)  # The in-flight reads finish (and complain) now, not later.
        _ignore_abandoned_reads()
        return None, exc

  def refuse_if_only_damaged_remain(self) -> None:
    """A workdir whose every checkpoint was moved aside as damaged does not silently start over."""
    damaged_dir = self._damaged_dir()
    moved = sorted(p.name for p in damaged_dir.iterdir()) if damaged_dir.is_dir() else []
    if moved and not self.all_steps():
      raise UserError(f"no checkpoint is left in {self.directory}: every one was damaged and moved to "
                      f"{damaged_dir} ({', '.join(moved)}). Restarting would silently begin again at step 0: "
                      f"to do that, delete {damaged_dir} (or use a new --workdir)")

  def metrics(self, step: int) -> dict[str, float] | None:
    return self.manager.metrics(step)

  def close(self) -> None:
    self.manager.close()

  def check_step(self, step: int) -> None:
    if step not in self.all_steps():
      raise UserError(f"checkpoint step {step} does not exist in {self.directory}; "
                      f"available steps: {self.all_steps()}")

  def _damaged_dir(self) -> paths.epath.Path:
    return self.workdir / "checkpoints_damaged"

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      paths.move_tree(self.manager.directory / str(step),
                      self._damaged_dir() / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
    multihost_utils.sync_global_devices(f"move_aside_checkpoint_{step}")
    self.manager.reload()
