"""Preemption notices (SIGTERM): tell the training loop at which step every process saves and stops.

Schedulers (Cloud TPU maintenance, SLURM `--signal`, Kubernetes) send SIGTERM some time before they
kill a job. The loop asks `reached(step)` after every step; once it answers True the loop saves a
checkpoint at that step and exits cleanly.

- Several processes (`jax.distributed` is initialized): JAX's preemption sync manager catches
  SIGTERM on any process, spreads the notice, and picks one step that every process reaches;
  `reached` is True at that same step everywhere, so all processes save the same checkpoint.
- One process: a Python SIGTERM handler sets a flag; `reached` is True at the next step boundary.
"""

from __future__ import annotations

import signal
import threading

from absl import logging
from jax.experimental import multihost_utils
from jax._src import distributed  # pylint: disable=protected-access  (no public "is initialized")


class PreemptionWatcher:
  """Use as a context manager around the training loop; call `reached(step)` after every step."""

  def __init__(self):
    self._notice = threading.Event()
    self._previous_handler = None
    self._multi_process = distributed.global_state.client is not None

  def __enter__(self) -> "PreemptionWatcher":
    if not self._multi_process:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def _on_sigterm(self, signum, frame) -> None:  # pylint: disable=unused-argument
    # Only set a flag: the step in flight finishes, then the loop saves and exits.
    self._notice.set()

  def reached(self, step: int) -> bool:
    """True at the step where this run should save and stop (the same step on every process)."""
    if self._multi_process:
      hit = multihost_utils.reached_preemption_sync_point(step)
    else:
      hit = self._notice.is_set()
    if hit:
      logging.warning("Preemption notice (SIGTERM): saving a checkpoint at step %d and stopping.", step)
    return hit
