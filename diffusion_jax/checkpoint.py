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

import os
import shutil
import time
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax.errors import UserError

# Metrics that can rank checkpoints for `keep_best_checkpoints`, and whether lower is better.
BEST_METRICS = {"eval_loss": "min"}


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _bits_sum(array: np.ndarray) -> int:
  """The bits of `array` summed as unsigned integers of its item size, modulo 2^32."""
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[array.dtype.itemsize]
  return int(np.ascontiguousarray(array).view(unsigned).sum(dtype=np.uint64)) % 2**32


def _local_leaf_sum(leaf: Any) -> int:
  """_bits_sum over the shards this process holds, each distinct shard once (replica 0)."""
  if isinstance(leaf, jax.Array):
    return sum(_bits_sum(np.asarray(shard.data)) for shard in leaf.addressable_shards if shard.replica_id == 0)
  return _bits_sum(np.asarray(leaf))


def fingerprint(tree: Any) -> int:
  """A 32-bit checksum of every bit of every leaf, independent of how the leaves are sharded.

  Each leaf's bits are summed modulo 2^32, so the order of the sum (and the layout of the shards) does
  not matter; leaf sums are combined with position weights, so swapping two leaves changes it too.
  Computed on the host from the shards each process holds (no device program: dispatching many small
  collective programs can deadlock simulated CPU devices), then summed over processes.
  """
  sums = np.asarray([_local_leaf_sum(leaf) for leaf in jax.tree.leaves(tree)], np.uint64)
  if jax.process_count() > 1:
    sums = np.sum(multihost_utils.process_allgather(sums.astype(np.uint32)), axis=0, dtype=np.uint64) % 2**32
  return sum((i + 1) * int(s) for i, s in enumerate(sums)) % 2**32


class Checkpointer:
  """Saves and restores a run's state, data-iterator position and config.

  max_to_keep: the latest checkpoints kept. keep_best (with best_metric): also keep this many
  checkpoints with the best `metrics[best_metric]` passed to `save`.
  """

  def __init__(self, workdir: str, *, max_to_keep: int | None = None, keep_best: int = 0,
               best_metric: str = "eval_loss", read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
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
      raise UserError(f"cannot read checkpoints in {checkpoint_dir(workdir)!r}: {exc}") from exc

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, config_dict: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save; `wait()` blocks until it is on disk."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config_dict),
        integrity=ocp.args.JsonSave({"state_fingerprint": fingerprint(state)})), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    """The state at `step` (sharded as `abstract_state` says); restores `data_iterator` in place.

    Raises UserError for a step that does not exist, and ValueError when the files do not restore
    to a state with the saved fingerprint.
    """
    self._check_step(step)
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

  def restore_subtree(self, step: int, name: str, abstract_subtree: Any) -> Any:
    """Only `state.<name>` (e.g. the EMA parameters) of the checkpoint at `step`."""
    self._check_step(step)
    abstract = {name: abstract_subtree}
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True)))
    return restored["state"][name]

  def restore_latest_good(self, restore_fn: Callable[[int], Any]) -> tuple[int | None, Any]:
    """`(step, restore_fn(step))` for the newest checkpoint that restores; (None, None) if there is none.

    A checkpoint that fails (truncated or corrupted files) is moved to `checkpoints_damaged/` with a
    warning, and the one before it is tried. All processes agree on the outcome of every attempt.
    """
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        result, error = restore_fn(step), None
      except Exception as exc:  # pylint: disable=broad-except  (any failure means: do not use it)
        result, error = None, exc
      failed_anywhere = bool(np.max(multihost_utils.process_allgather(np.int32(error is not None))))
      if not failed_anywhere:
        return step, result
      logging.warning("Checkpoint step %d in %s cannot be restored (%s); moving it to %s and falling back "
                      "to the previous checkpoint.", step, self.directory,
                      f"{type(error).__name__}: {str(error)[:300]}" if error else "failed on another process",
                      self._damaged_dir())
      self._move_aside(step)
      damaged.append(step)
    if damaged:  # Starting over silently would look like lost work.
      raise UserError(f"no checkpoint in {self.directory} could be restored (steps {damaged} are damaged and "
                      f"were moved to {self._damaged_dir()}); delete the workdir to start over")
    return None, None

  def metrics(self, step: int) -> dict[str, float] | None:
    return self.manager.metrics(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def _check_step(self, step: int) -> None:
    if step not in self.all_steps():
      raise UserError(f"checkpoint step {step} does not exist in {self.directory}; "
                      f"available steps: {self.all_steps()}")

  def _damaged_dir(self) -> str:
    return os.path.join(self.workdir, "checkpoints_damaged")

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      os.makedirs(self._damaged_dir(), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)),
                  os.path.join(self._damaged_dir(), f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"))
    multihost_utils.sync_global_devices(f"move_aside_checkpoint_{step}")
    self.manager.reload()
