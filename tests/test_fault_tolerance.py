"""Runs killed, preempted, fed NaNs or left with damaged checkpoints still end exactly where they should.

The SIGKILL/SIGTERM tests start real training processes (`python -m diffusion_jax.main`) and compare
every leaf of the final train state (params, EMA, optimizer state, RNG, step) bit for bit with an
uninterrupted run of the same config.
"""

import dataclasses
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

from diffusion_jax import build, inference, run_files, train, train_state
from diffusion_jax import train_step as train_step_lib
from diffusion_jax.data import pipeline
from diffusion_jax.checkpoint import Checkpointer, fingerprint
from diffusion_jax.errors import NonFiniteError, UserError
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 120
# log_every_steps=1 makes each step wait for its metrics, so a run takes seconds and can be hit mid-way.
ARGS = ["--config=configs/smoke.py", f"--config.num_train_steps={STEPS}", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=40", f"--config.sample_every_steps={STEPS}",
        "--config.eval_num_examples=16"]


def _start(workdir, data_dir, extra_args=()):
  """A training process; its output goes to a file (a full pipe would stall a run that logs every step)."""
  env = dict(os.environ, DIFFUSION_JAX_DATA_DIR=data_dir, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, f"log.{time.time_ns()}.txt"), "w+")  # pylint: disable=consider-using-with
  proc = subprocess.Popen([sys.executable, "-m", "diffusion_jax.main", f"--workdir={workdir}", *ARGS, *extra_args],
                          cwd=REPO,
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
  run = build.build(inference.read_config(workdir), mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  abstract = run.abstract_state()
  checkpointer = Checkpointer(workdir, read_only=True)
  state = checkpointer.restore(checkpointer.latest_step() if step is None else step, abstract)
  checkpointer.close()
  return jax.device_get(state)


def one_device_run(config, optimizer=None):
  """(run, a fresh train state, its shardings) on one device; `optimizer` replaces the config's."""
  run = build.build(config, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  if optimizer is not None:
    run = dataclasses.replace(run, optimizer=optimizer)
  state, shardings = train_state.create_train_state(jax.random.PRNGKey(0), run.model, run.optimizer, run.mesh,
                                                    run.rules)
  return run, state, shardings


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
  # The redone steps replaced their first rows: one loss row per step, as in an uninterrupted run.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [r["step"] for r in map(json.loads, f) if "loss" in r]
  assert logged == list(range(1, STEPS + 1))
  # Libraries' INFO chatter (orbax logged ~150 lines per short run) stays out of the log.
  assert "atomicity.py" not in stderr and "checkpoint_manager.py" not in stderr, stderr[-2000:]


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


class _NaNImages:
  """Wraps the training iterator: the batches of the given (1-based) steps get float NaN images."""

  def __init__(self, iterator, nan_steps):
    self._iterator, self._nan_steps, self._step = iterator, set(nan_steps), 0

  def __next__(self):
    batch, self._step = next(self._iterator), self._step + 1
    if self._step in self._nan_steps:
      batch = dict(batch, image=np.full(batch["image"].shape, np.nan, np.float32))
    return batch

  def __iter__(self):
    return self

  def get_state(self) -> bytes:  # grain's checkpoint handler stores other iterators' states as bytes.
    return json.dumps(self._iterator.get_state()).encode()

  def set_state(self, state: bytes):
    self._iterator.set_state(json.loads(state.decode()))


def _inject_nans(monkeypatch, nan_steps):
  create = train.pipeline.create_train_iterator
  monkeypatch.setattr(train.pipeline, "create_train_iterator",
                      lambda config, **kwargs: _NaNImages(create(config, **kwargs), nan_steps))


def test_nan_batches_are_skipped_and_counted_and_too_many_in_a_row_stop_the_run(config, tmp_path, monkeypatch):
  config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 30, 5, 10
  config.max_consecutive_nonfinite_steps, config.eval_num_examples = 3, 16
  _inject_nans(monkeypatch, {3} | set(range(12, 31)))  # One bad step, then bad steps from 12 on.
  workdir = str(tmp_path / "diverged")
  with pytest.raises(NonFiniteError, match=r"3 consecutive steps \(12 to 14\) had a non-finite loss or gradient "
                                           r"and were skipped .* The last checkpoint \(step 10\) is left as it was"):
    train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [r for r in map(json.loads, f) if "loss" in r]
  # Step 3 was skipped and counted; the loss is the mean over the finite steps.
  assert [(r["step"], r["skipped_nonfinite"]) for r in logged] == [(5, 1.0), (10, 0.0)]
  assert all(np.isfinite(r["loss"]) for r in logged)
  # The run stopped before saving inside the bad streak: step 10 is the latest checkpoint, intact.
  assert Checkpointer(workdir, read_only=True).all_steps() == [10]
  state = _state(workdir)
  assert (int(state.step), int(state.nonfinite_steps), int(state.nonfinite_streak)) == (10, 1, 0)
  for leaf in jax.tree.leaves((state.params, state.ema_params)):
    assert np.all(np.isfinite(leaf))


def test_the_skipped_step_leaves_params_ema_and_optimizer_state_unchanged(config):
  run, state, shardings = one_device_run(config)
  step = train_step_lib.make_train_step(run, shardings)
  batch = next(pipeline.create_train_iterator(config, tokenizer=run.conditioning.tokenizer))
  good = {"image": jnp.asarray(batch["image"], jnp.float32), "tokens": jnp.asarray(batch["tokens"])}
  bad = dict(good, image=good["image"].at[0, 0, 0, 0].set(jnp.nan))
  before = jax.device_get(state)
  after, metrics = step(state, bad)
  after = jax.device_get(after)
  assert not np.isfinite(metrics["loss"]) and int(metrics["skipped_nonfinite"]) == 1
  assert (int(after.step), int(after.nonfinite_steps), int(after.nonfinite_streak)) == (1, 1, 1)
  _assert_bit_identical((after.params, after.ema_params, after.opt_state, after.rng),
                        (before.params, before.ema_params, before.opt_state, before.rng))
  after, metrics = step(jax.device_put(after, shardings), good)
  assert int(metrics["skipped_nonfinite"]) == 0 and (int(after.nonfinite_steps), int(after.nonfinite_streak)) == (1, 0)


def _largest_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(twenty_steps, tmp_path, damage, caplog):
  config, original, final = twenty_steps
  workdir = str(tmp_path / "run")
  shutil.copytree(original, workdir)
  target = _largest_file(os.path.join(workdir, "checkpoints", "20", "state"))
  size = os.path.getsize(target)
  if damage == "truncate":
    with open(target, "r+b") as f:
      f.truncate(size // 2)
  else:  # Same size, different bytes in the middle.
    with open(target, "r+b") as f:
      f.seek(size // 2)
      chunk = f.read(64)
      f.seek(size // 2)
      f.write(bytes(b ^ 0xFF for b in chunk))

  caplog.set_level(logging.WARNING)
  resumed = train.train_and_evaluate(config, workdir)  # Restores step 10, trains 11…20 again.
  assert "Checkpoint step 20 in" in caplog.text and "cannot be restored" in caplog.text
  damaged = os.listdir(os.path.join(workdir, "checkpoints_damaged"))
  assert len(damaged) == 1 and damaged[0].startswith("20.")
  _assert_bit_identical(resumed, final)


def test_a_good_checkpoint_is_not_removed_before_its_successor_is_committed(config, tmp_path):
  _, state, _ = one_device_run(config)
  iterator = pipeline.create_train_iterator(config)
  checkpointer = Checkpointer(str(tmp_path), max_to_keep=1)
  checkpointer.save(1, state, iterator, config.to_dict())
  checkpointer.wait()
  committed = lambda: [d for d in os.listdir(checkpointer.directory) if d.isdigit()]
  checkpointer.save(2, state.replace(step=jnp.int32(2)), iterator, config.to_dict())
  observations = 0
  while checkpointer.manager.is_saving_in_progress():  # Step 2 is being written in the background.
    assert committed(), "no committed checkpoint on disk during the save"
    observations += 1
  assert observations > 0
  checkpointer.wait()
  assert committed() == ["2"]
  checkpointer.close()


def test_resuming_with_a_config_that_changes_the_run_is_a_clear_error(config, tmp_path):
  workdir = str(tmp_path)
  run_files.write_config(config, workdir)
  os.makedirs(os.path.join(workdir, "checkpoints", "10"))
  changed = config.copy_and_resolve_references()
  changed.model.unet.channels, changed.optimizer.learning_rate = 32, 0.5
  changed.num_train_steps, changed.mesh.shape, changed.log_every_steps = 99, (1, 1, 1), 7  # Safe to change.
  with pytest.raises(UserError) as error:
    run_files.check_resumable(changed, workdir)
  assert "model.unet.channels: 16 -> 32" in str(error.value)
  assert "optimizer.learning_rate: 0.001 -> 0.5" in str(error.value)
  assert "num_train_steps" not in str(error.value) and "mesh.shape" not in str(error.value)
  changed.model.unet.channels, changed.optimizer.learning_rate = 16, 0.001
  run_files.check_resumable(changed, workdir)  # Only resume-safe keys differ now.
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  changed.model.unet.channels = 32
  run_files.check_resumable(changed, workdir)  # Nothing to resume: any config may start here.


def test_fingerprint_sees_every_bit_and_the_order_of_leaves():
  tree = {"a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones((4,), jnp.bfloat16),
          "c": jnp.array([7], jnp.int32)}
  base = fingerprint(tree)
  assert base == fingerprint(jax.tree.map(np.asarray, tree))  # Host or device, same bits, same value.
  flipped = np.asarray(tree["a"]).copy()
  flipped.view(np.uint32)[1, 2] ^= 1  # The lowest mantissa bit of one float.
  assert fingerprint(dict(tree, a=jnp.asarray(flipped))) != base
  assert fingerprint(dict(tree, b=tree["b"].at[0].set(2.0))) != base
  assert fingerprint({"a": tree["c"], "b": tree["b"], "c": tree["a"]}) != base  # Same leaves, other places.


def test_keep_best_keeps_the_lowest_eval_loss_besides_the_latest(config, tmp_path):
  iterator = pipeline.create_train_iterator(config)
  checkpointer = Checkpointer(str(tmp_path), max_to_keep=1, keep_best=2)
  for step, loss in enumerate([0.5, 0.3, 0.6, 0.4, 0.7], start=1):
    checkpointer.save(step, {"w": jnp.full((3,), float(step))}, iterator, config.to_dict(), {"eval_loss": loss})
    checkpointer.wait()
  assert checkpointer.all_steps() == [2, 4, 5]  # Best (0.3, 0.4) and latest.
  restored = checkpointer.restore(2, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
  np.testing.assert_array_equal(restored["w"], [2.0, 2.0, 2.0])
  checkpointer.close()
