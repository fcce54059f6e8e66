"""Preemption notices (SIGTERM) and Ctrl-C (SIGINT): tell the training loop at which step to save and stop.

Schedulers (Cloud TPU maintenance, SLURM `--signal`, Kubernetes) send SIGTERM some time before they
kill a job. The loop asks `reached(step)` after every step; once it answers True the loop saves a
checkpoint at that step and exits cleanly.

- Several processes (`jax.distributed` is initialized): JAX's preemption sync manager catches
  SIGTERM on any process, spreads the notice, and picks one step that every process reaches;
  `reached` is True at that same step everywhere, so all processes save the same checkpoint.
- One process: a Python SIGTERM handler sets a flag; `reached` is True at the next step boundary.

Ctrl-C is treated the same way: the first SIGINT finishes the step, saves and stops (with several
processes it is turned into a SIGTERM of this process, so the sync manager makes every process save
the same step); a second SIGINT exits at once. The default KeyboardInterrupt, raised wherever the
main thread happens to be, would leave background checkpoint threads and XLA mid-flight (it ended
in a segmentation fault).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from absl import logging
from jax.experimental import multihost_utils
from jax._src import distributed  # pylint: disable=protected-access  (no public "is initialized")

EXIT_CODE_INTERRUPTED = 130  # The shell's convention for a command ended by SIGINT.


class PreemptionWatcher:
  """Use as a context manager around a training run; call `reached(step)` after every step."""

  def __init__(self):
    self._notice = threading.Event()
    self._user_interrupt = threading.Event()
    self._previous_handlers = {}
    self._multi_process = distributed.global_state.client is not None

  def __enter__(self) -> "PreemptionWatcher":
    if threading.current_thread() is not threading.main_thread():
      return self  # Signal handlers can only be installed from the main thread (e.g. under a test runner).
    if not self._multi_process:
      self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._previous_handlers.clear()

  def _on_sigterm(self, signum, frame) -> None:  # pylint: disable=unused-argument
    # Only set a flag: the step in flight finishes, then the loop saves and exits.
    self._notice.set()

  def _on_sigint(self, signum, frame) -> None:  # pylint: disable=unused-argument
    if self._user_interrupt.is_set():
      sys.stderr.write("\nSecond Ctrl-C: exiting now without saving (the last checkpoint is intact).\n")
      sys.stderr.flush()
      os._exit(EXIT_CODE_INTERRUPTED)  # pylint: disable=protected-access  (now, not at the next bytecode)
    self._user_interrupt.set()
    sys.stderr.write("\nCtrl-C: finishing the current step, then saving a checkpoint and stopping. "
                     "Press Ctrl-C again to exit at once without saving.\n")
    sys.stderr.flush()
    if self._multi_process:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier spreads it to every process.
    else:
      self._notice.set()

  def requested(self) -> bool:
    """True once this process got a stop request (only meaningful with one process)."""
    return not self._multi_process and self._notice.is_set()

  def interrupted_by_user(self) -> bool:
    return self._user_interrupt.is_set()

  def reason(self) -> str:
    return "Ctrl-C" if self._user_interrupt.is_set() else "a preemption notice (SIGTERM)"

  def reached(self, step: int) -> bool:
    """True at the step where this run should save and stop (the same step on every process)."""
    if self._multi_process:
      hit = multihost_utils.reached_preemption_sync_point(step)
    else:
      hit = self._notice.is_set()
    if hit:
      logging.warning("Stop requested by %s: saving a checkpoint at step %d and stopping.", self.reason(), step)
    return hit
