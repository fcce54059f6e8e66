"""Runs killed, preempted, fed NaNs or left with damaged checkpoints still end exactly where they should.

The SIGKILL/SIGTERM tests start real training processes (`python -m diffusion_jax.main`) and compare
every leaf of the final train state (params, EMA, optimizer state, RNG, step) bit for bit with an
uninterrupted run of the same config.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import inference, train, train_state
from diffusion_jax.checkpoint import Checkpointer
from diffusion_jax.errors import NonFiniteError, UserError
from diffusion_jax.models.unet import create_model
from diffusion_jax.parallel import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 120
# log_every_steps=1 makes each step wait for its metrics, so a run takes seconds and can be hit mid-way.
ARGS = ["--config=configs/smoke.py", f"--config.num_train_steps={STEPS}", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=40", f"--config.sample_every_steps={STEPS}",
        "--config.eval_num_examples=16"]


def _start(workdir, data_dir):
  """A training process; its output goes to a file (a full pipe would stall a run that logs every step)."""
  env = dict(os.environ, DIFFUSION_JAX_DATA_DIR=data_dir, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, f"log.{time.time_ns()}.txt"), "w+")  # pylint: disable=consider-using-with
  proc = subprocess.Popen([sys.executable, "-m", "diffusion_jax.main", f"--workdir={workdir}", *ARGS], cwd=REPO,
                          env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
  proc.log = log
  return proc


def _output(proc):
  proc.log.seek(0)
  return proc.log.read()


def _logged_step(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return max([r["step"] for r in map(json.loads, f) if "loss" in r], default=0)
  except (FileNotFoundError, json.JSONDecodeError):
    return 0


def _wait_for_step(proc, workdir, step, committed_checkpoint):
  """Until the run has logged `step` and committed the checkpoint at `committed_checkpoint`."""
  deadline = time.time() + 300
  checkpoint = os.path.join(workdir, "checkpoints", str(committed_checkpoint))
  while _logged_step(workdir) < step or not os.path.isdir(checkpoint):
    assert proc.poll() is None, _output(proc)[-3000:]
    assert time.time() < deadline
    time.sleep(0.02)


def _finish(proc):
  proc.wait(timeout=600)
  output = _output(proc)
  assert proc.returncode == 0, output[-3000:]
  return output


def _state(workdir, step=None):
  """The full train state of `workdir`'s checkpoint `step` (default: the latest), on one device."""
  config = inference.read_config(workdir)
  mesh = mesh_lib.create_mesh((1, 1, 1), jax.devices()[:1])
  abstract = train_state.abstract_train_state(create_model(config), train_state.create_optimizer(config), mesh,
                                              mesh_lib.logical_rules(config))
  checkpointer = Checkpointer(workdir, read_only=True)
  state = checkpointer.restore(checkpointer.latest_step() if step is None else step, abstract)
  checkpointer.close()
  return jax.device_get(state)


def _assert_bit_identical(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  _finish(_start(workdir, data_dir))
  return _state(workdir)


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_is_bit_identical(data_dir, tmp_path, uninterrupted):
  workdir = str(tmp_path / "killed")
  proc = _start(workdir, data_dir)
  _wait_for_step(proc, workdir, 55, 40)  # Past the checkpoint at 40: steps 41… are lost and redone.
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _logged_step(workdir)
  assert proc.returncode == -signal.SIGKILL and 55 <= killed_at < STEPS, (proc.returncode, killed_at)

  stderr = _finish(_start(workdir, data_dir))
  assert "Resuming at step 40." in stderr or "Resuming at step 80." in stderr  # 80: if it was committed.
  assert int(uninterrupted.step) == STEPS
  _assert_bit_identical(_state(workdir), uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_reached_and_exits_cleanly(data_dir, tmp_path, uninterrupted):
  workdir = str(tmp_path / "preempted")
  proc = _start(workdir, data_dir)
  _wait_for_step(proc, workdir, 55, 40)
  proc.send_signal(signal.SIGTERM)
  stderr = _finish(proc)  # Exit code 0.
  reached = _logged_step(workdir)  # The last step it finished, logged at the preemption.
  assert 55 <= reached < STEPS
  assert f"saving a checkpoint at step {reached} and stopping" in stderr
  assert Checkpointer(workdir, read_only=True).latest_step() == reached
  assert int(_state(workdir).step) == reached

  stderr = _finish(_start(workdir, data_dir))
  assert f"Resuming at step {reached}" in stderr
  _assert_bit_identical(_state(workdir), uninterrupted)
