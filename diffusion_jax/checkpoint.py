"""Orbax checkpoints of a run: `workdir/checkpoints/<step>/{state, data, config}`.

`state` is the TrainState (params, EMA, optimizer state, step, RNG), `data` the grain iterator
position of every process, `config` the resolved config. Saves are asynchronous; orbax writes each
step to a temporary directory and renames it only when complete, so an interrupted save never
replaces a finished checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from absl import logging

from diffusion_jax.errors import UserError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves and restores a run's state, data-iterator position and config."""

  def __init__(self, workdir: str, *, max_to_keep: int | None = None, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=not read_only)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                         item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, config_dict: dict[str, Any]) -> None:
    """Starts an asynchronous save; `wait()` blocks until it is on disk."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config_dict)), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    """Restores the state (sharded as `abstract_state` says) and, if given, the iterator in place."""
    if step not in self.all_steps():
      raise UserError(f"checkpoint step {step} does not exist; available steps: {self.all_steps()}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint at step %d from %s", step, self.manager.directory)
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
