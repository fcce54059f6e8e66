"""The failures a hostile tester found: each one either lost a run or handed out wrong images with exit 0.

Each test reproduces the report (the same command, or its in-process equivalent) on real files: damaged
checkpoint bytes, a full or read-only file system (a tmpfs mounted by the test, skipped where mounting
is not allowed), two trainers on one workdir, Ctrl-C.
"""

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import config as config_lib
from diffusion_jax import checkpoint as checkpoint_lib
from diffusion_jax import inference, run_files, train, train_state
from diffusion_jax.data import pipeline
from diffusion_jax.checkpoint import Checkpointer
from diffusion_jax.diffusion import samplers
from diffusion_jax.errors import NonFiniteError, UserError
from tests.conftest import tiny_config
from tests.test_cli import _assert_one_line_error, _run
from tests.test_fault_tolerance import (_finish, _logged_step, _output, _start, _state, _wait_for_step,
                                        one_device_run)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def trained(twenty_steps):
  """(config, workdir) of the session's 20-step run (checkpoints at 10 and 20); tests work on copies."""
  config, workdir, _ = twenty_steps
  return config.copy_and_resolve_references(), workdir


def _copy(workdir, tmp_path, name="run"):
  target = str(tmp_path / name)
  shutil.copytree(workdir, target)
  return target


def _scramble_state_files(workdir, step):
  """Random bytes written into the middle of every data file of the checkpoint's state (same size)."""
  data_dir = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d")
  rng = np.random.default_rng(step)
  files = [os.path.join(data_dir, f) for f in os.listdir(data_dir)]
  assert files
  for path in files:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.seek(size // 3)
      f.write(rng.integers(0, 256, size // 3, dtype=np.uint8).tobytes())


# 1. A damaged checkpoint is never sampled or exported silently.

def test_sample_and_export_skip_a_damaged_latest_checkpoint(trained, tmp_path, caplog):
  _, original = trained
  workdir = _copy(original, tmp_path)
  _scramble_state_files(workdir, 20)
  good = inference.load(original, 10)

  caplog.set_level(logging.WARNING)
  loaded = inference.load(workdir)  # No --step: the newest checkpoint that verifies.
  assert loaded.step == 10
  assert "Checkpoint step 20" in caplog.text and "cannot be restored" in caplog.text
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(good.params)):
    np.testing.assert_array_equal(a, b)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "20"))  # A reader leaves the workdir as it is.

  with pytest.raises(UserError, match=r"checkpoint step 20 in .* is damaged .*choose another --step from \[10, 20\]"):
    inference.load(workdir, 20)

  out = inference.export(workdir, str(tmp_path / "export"))
  with open(os.path.join(out, "export.json")) as f:
    assert json.load(f)["step"] == 10
  assert inference.load(out).step == 10


def test_sample_cli_on_a_damaged_checkpoint_is_a_one_line_error(trained, tmp_path):
  _, original = trained
  workdir = _copy(original, tmp_path)
  for step in (10, 20):
    _scramble_state_files(workdir, step)
  _assert_one_line_error(*_run("diffusion_jax.sample", f"--workdir={workdir}", f"--out={tmp_path / 's.npz'}"),
                         "no checkpoint in", "could be restored", "[20, 10]")
  _assert_one_line_error(*_run("diffusion_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'e'}"),
                         "could be restored")
  assert not os.path.exists(tmp_path / "s.npz") and not os.path.exists(tmp_path / "e" / "export.json")


def test_every_checkpoint_damaged_stops_every_rerun(trained, tmp_path):
  config, original = trained
  workdir = _copy(original, tmp_path)
  for step in (10, 20):
    _scramble_state_files(workdir, step)
  with pytest.raises(UserError, match="no checkpoint in .* could be restored"):
    train.train_and_evaluate(config, workdir)
  # The damaged checkpoints were moved aside; the second rerun must not start over at step 0 silently.
  with pytest.raises(UserError, match=r"every one was damaged and moved to .*checkpoints_damaged.*delete"):
    train.train_and_evaluate(config, workdir)
  assert not os.listdir(os.path.join(workdir, "checkpoints"))


# 2. and 5. Bad settings are one-line errors before any work.

FLOAT_KEYS = sorted(k for k, v in config_lib.flatten(config_lib.get_default_config()).items()
                    if isinstance(v, float))


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_every_float_option_rejects_nan_and_inf(key, value):
  config = config_lib.get_default_config()
  parent, leaf = config, key
  for part in key.split(".")[:-1]:
    parent = parent[part]
  leaf = key.split(".")[-1]
  parent[leaf] = value
  with pytest.raises(UserError, match=rf"config\.{key}=.* must be"):
    config_lib.validate(config)


@pytest.mark.parametrize("key, value, message", [
    ("optimizer.learning_rate", 0.0, r"must be in \(0, inf\)"),
    ("optimizer.b2", 1.0, r"must be in \[0, 1\)"),
    ("optimizer.warmup_steps", -1, r"must be in \[0, inf\)"),
    ("sampling.eta", 1.5, r"eta=1.5 must be in \[0, 1\]"),
    ("sampling.guidance_rescale", -0.1, r"must be in \[0, 1\]"),
    ("sampling.guidance_interval", (0.5, 0.2), r"0 <= lo <= hi <= 1"),
    ("sampling.dynamic_threshold_percentile", 0.0, r"must be in \(0, 1\]"),
    ("sampling.num_per_prompt", 0, "must be a positive integer"),
    ("sampling.num_steps", 101, r"steps=101 must be in \[1, 100\]"),
    ("sampling.prompts", "x" * 40, "allows at most 30 bytes"),
    ("model.unet.norm_groups", 5, "norm_groups=5 does not divide the 16 channels of level 0"),
    ("model.unet.head_dim", 24, "head_dim=24 does not divide the 32 channels of level 1"),
    ("model.text_encoder.num_heads", 3, "num_heads=3 does not divide width=32"),
    ("auto_gradient_accumulation", None, "auto_gradient_accumulation=None must be True or False"),
    ("diffusion.learn_sigma", None, "learn_sigma=None must be True or False"),
])
def test_out_of_range_values_are_rejected_before_training(key, value, message):
  config = tiny_config()
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(UserError, match=message):
    config_lib.validate(config)


def test_sampler_options_reject_nan(tmp_path):
  for field in ("eta", "guidance_rescale"):
    with pytest.raises(UserError, match=f"{field}=nan must be in"):
      samplers.SamplerOptions(**{field: math.nan}).validate(1000)
  with pytest.raises(UserError, match="guidance_interval"):
    samplers.SamplerOptions(guidance_interval=(0.0, math.nan)).validate(1000)


def test_bad_numbers_from_the_command_line_and_config_files(tmp_path):
  _assert_one_line_error(*_run("diffusion_jax.main", "--config=configs/smoke.py", f"--workdir={tmp_path / 'a'}",
                               "--config.optimizer.learning_rate=nan"),
                         "config.optimizer.learning_rate=nan must be a finite number")
  _assert_one_line_error(*_run("diffusion_jax.main", "--config=configs/smoke.py", f"--workdir={tmp_path / 'b'}",
                               "--config.sampling.num_per_prompt=0"),
                         "config.sampling.num_per_prompt=0 must be a positive integer")
  config_file = tmp_path / "nan_config.py"
  config_file.write_text("from configs import smoke\n\ndef get_config():\n  c = smoke.get_config()\n"
                         "  c.sampling.guidance_scale = float('nan')\n  return c\n")
  _assert_one_line_error(*_run("diffusion_jax.main", f"--config={config_file}", f"--workdir={tmp_path / 'c'}"),
                         "config.sampling.guidance_scale=nan must be a finite number")
  assert not os.path.exists(tmp_path / "a" / "config.json")  # Rejected before anything was written.


def test_a_config_file_with_an_error_names_the_file_and_line(tmp_path):
  syntax = tmp_path / "syntax.py"
  syntax.write_text("from configs import smoke\n\ndef get_config()\n  return smoke.get_config()\n")
  _assert_one_line_error(*_run("diffusion_jax.main", f"--config={syntax}", f"--workdir={tmp_path / 'w'}"),
                         f"config file '{syntax}', line 3: SyntaxError: expected ':'")
  name = tmp_path / "name.py"
  name.write_text("from configs import smoke\n\ndef get_config():\n  c = smoke.get_config()\n"
                  "  c.seed = undefined_seed\n  return c\n")
  _assert_one_line_error(*_run("diffusion_jax.main", f"--config={name}", f"--workdir={tmp_path / 'w'}"),
                         f"config file '{name}', line 5 (in get_config): NameError: name 'undefined_seed'")


# 3. A NaN learning rate (or any non-finite update) stops the run before it reaches a checkpoint.

def _nan_updates_from(count: int):
  """AdamW followed by a scale that turns NaN from optimizer step `count` on: what
  `optimizer.learning_rate=nan` did, with finite losses and gradients throughout."""
  create = train_state.create_optimizer
  return lambda config, **kwargs: optax.chain(
      create(config, **kwargs), optax.scale_by_schedule(lambda n: jnp.where(n >= count, jnp.nan, 1.0)))


def test_a_non_finite_update_from_finite_gradients_stops_the_run(config, tmp_path, monkeypatch):
  config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 20, 5, 10
  config.eval_num_examples = 16
  monkeypatch.setattr(train_state, "create_optimizer", _nan_updates_from(12))  # Step 13's update is NaN.
  workdir = str(tmp_path / "nan_update")
  with pytest.raises(NonFiniteError, match=r"step 13 had a finite loss and gradient but its update \(learning rate "
                                           r"[0-9.e-]+\) made the parameters non-finite \(parameter norm nan at "
                                           r"step 15\); stopping. The last checkpoint \(step 10\) is left as it was"):
    train.train_and_evaluate(config, workdir)
  # The run stopped at step 15's log line, before its next checkpoint: step 10 is the latest, finite.
  assert Checkpointer(workdir, read_only=True).all_steps() == [10]
  state = _state(workdir)
  assert int(state.step) == 10 and int(state.nonfinite_steps) == 0
  for leaf in jax.tree.leaves((state.params, state.ema_params, state.opt_state)):
    assert np.all(np.isfinite(leaf))


def _step_metrics(skipped: list[int], learning_rate: float = 1e-3) -> list[dict[str, np.ndarray]]:
  """Per-step metrics as train.py fetches them, for consecutive steps; `skipped[i]` 1: step i was skipped."""
  streak, out = 0, []
  for s in skipped:
    streak = (streak + 1) * s
    out.append({"loss": np.float32(np.nan if s else 0.5), "grad_norm": np.float32(np.nan if s else 2.0),
                "skipped_nonfinite": np.int32(s), "nonfinite_streak": np.int32(streak),
                "learning_rate": np.float32(learning_rate)})
  return out


def test_summarize_names_the_step_whose_update_made_the_parameters_non_finite(config):
  config.max_consecutive_nonfinite_steps = 3
  # Steps 21 to 25: 22 was skipped (a NaN gradient), 23 applied a NaN update, so 24 and 25 ran on NaN parameters.
  metrics = _step_metrics([0, 1, 0, 1, 1], learning_rate=0.25)
  with pytest.raises(NonFiniteError, match=r"^step 23 had a finite loss and gradient but its update \(learning "
                                           r"rate 0.25\) made the parameters non-finite \(parameter norm inf at "
                                           r"step 25\); stopping. The last checkpoint \(step 20\) is left"):
    train.summarize(metrics, 25, config, 20, float("inf"))
  # Already non-finite at the check before a checkpoint that follows the log line (no steps since).
  with pytest.raises(NonFiniteError, match=r"^the parameters are non-finite \(parameter norm nan at step 25\)"):
    train.summarize([], 25, config, 20, float("nan"))
  # Finite parameters: the mean over the steps that were not skipped, the norm as given.
  summary = train.summarize(metrics[:3], 23, config, 20, 12.5)
  assert summary == {"loss": 0.5, "grad_norm": 2.0, "learning_rate": 0.25, "skipped_nonfinite": 1.0,
                     "param_norm": 12.5}


def test_a_state_with_nan_parameters_is_never_saved(config, tmp_path):
  _, state, _ = one_device_run(config)
  iterator = pipeline.create_train_iterator(config)
  checkpointer = Checkpointer(str(tmp_path), max_to_keep=2)
  checkpointer.save(1, state, iterator, config.to_dict())
  checkpointer.wait()
  poisoned = state.replace(step=jnp.int32(2), ema_params=jax.tree.map(lambda p: p * jnp.nan, state.ema_params))
  with pytest.raises(NonFiniteError, match=r"at step 2 holds non-finite values .*ema_params.* not saved"):
    checkpointer.save(2, poisoned, iterator, config.to_dict())
  checkpointer.wait()
  assert checkpointer.all_steps() == [1]
  checkpointer.close()


def test_resume_check_treats_a_saved_nan_as_unchanged(config, tmp_path):
  config.optimizer.learning_rate = math.nan  # As a config.json written before NaN was rejected.
  run_files.write_config(config, str(tmp_path))
  os.makedirs(tmp_path / "checkpoints" / "10")
  run_files.check_resumable(config, str(tmp_path))  # No "optimizer.learning_rate: nan -> nan".


# 4. One trainer per workdir; Ctrl-C saves and stops cleanly.

@pytest.mark.slow
def test_a_second_trainer_on_the_same_workdir_is_refused(data_dir, tmp_path):
  workdir = str(tmp_path / "shared")
  # Too many steps to end on its own while the second starts (a 120-step run did, on a loaded 2-core host:
  # the second then found the lock released and the workdir a different config's); stopped by SIGTERM.
  first = _start(workdir, data_dir, ["--config.num_train_steps=100000"])
  deadline = time.time() + 300
  while _logged_step(workdir) < 1:  # The first run is training (it took the lock before anything else).
    assert first.poll() is None and time.time() < deadline, _output(first)[-3000:]
    time.sleep(0.05)
  second = _start(workdir, data_dir, ["--config.seed=7"])
  second.wait(timeout=300)
  second_output = _output(second)
  assert second.returncode == 2, second_output[-3000:]
  errors = [l for l in second_output.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "is in use by another training run" in errors[0] and f"pid {first.pid}" in errors[0]
  assert "Traceback" not in second_output
  assert first.poll() is None  # still training: the lock, not the finished run's config, refused the second
  first.send_signal(signal.SIGTERM)
  _finish(first)  # saves its step and exits cleanly
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["seed"] == 0  # The second run wrote nothing.
  assert not os.path.exists(os.path.join(workdir, ".lock"))  # Released at the end of the first run.


@pytest.mark.slow
def test_ctrl_c_saves_the_step_and_exits_cleanly_and_a_second_exits_at_once(data_dir, tmp_path):
  workdir = str(tmp_path / "interrupted")
  proc = _start(workdir, data_dir)
  _wait_for_step(proc, workdir, 45, 40)
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=300)
  output = _output(proc)
  reached = _logged_step(workdir)
  assert proc.returncode == 130, output[-3000:]
  assert f"Stop requested by Ctrl-C: saving a checkpoint at step {reached} and stopping" in output
  assert "Traceback" not in output and "Segmentation fault" not in output and "Fatal Python error" not in output
  assert Checkpointer(workdir, read_only=True).latest_step() == reached

  proc = _start(workdir, data_dir)  # Resumes; two Ctrl-C in a row stop it at once, without saving.
  _wait_for_step(proc, workdir, reached + 3, reached)
  proc.send_signal(signal.SIGINT)
  # Two signals that arrive before Python runs the handler count as one (CPython coalesces pending
  # signals), so the second Ctrl-C waits until the first one has been handled.
  deadline = time.time() + 60
  while "Ctrl-C: finishing the current step" not in open(proc.log.name).read():  # Not _output: no seek.
    assert proc.poll() is None and time.time() < deadline, _output(proc)[-3000:]
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=60)
  output = _output(proc)
  assert proc.returncode == 130 and "Second Ctrl-C: exiting now" in output, output[-3000:]
  assert "Traceback" not in output
  # Whatever was committed still restores (a save cut short is only a temporary directory).
  assert Checkpointer(workdir, read_only=True).latest_step() >= reached
  assert "Resuming at step" in _finish(_start(workdir, data_dir))


# Full and read-only file systems (real tmpfs mounts; root in a container may not be allowed to mount).

@contextlib.contextmanager
def _tmpfs(path, size_mb):
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}); "
                f"the disk-full and read-only tests need one")
  try:
    yield str(path)
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory, leave_bytes):
  """Fills the file system of `directory` with one file until `leave_bytes` are free."""
  stat = os.statvfs(directory)
  free = stat.f_bavail * stat.f_frsize
  filler = os.path.join(directory, "filler")
  with open(filler, "wb") as f:
    f.write(b"\0" * max(free - leave_bytes, 0))
  return filler


def test_disk_full_stops_the_run_at_once_with_one_line_and_keeps_the_last_checkpoint(config, tmp_path,
                                                                                    monkeypatch):
  config.num_train_steps, config.log_every_steps = 40, 1
  config.checkpoint_every_steps, config.sample_every_steps, config.eval_num_examples = 15, 1000, 16
  # How many steps run while a save is in flight depends on the machine; the test lets each save end
  # (without taking its error) before the next step, so "at once" means exactly the next step.
  save = Checkpointer.save

  def save_and_let_it_end(self, *args, **kwargs):
    save(self, *args, **kwargs)
    deadline = time.time() + 120
    while self.manager.is_saving_in_progress():
      assert time.time() < deadline, "the save did not end in 120 s"
      time.sleep(0.01)

  monkeypatch.setattr(Checkpointer, "save", save_and_let_it_end)
  with _tmpfs(tmp_path / "small", 48) as mount:
    workdir = os.path.join(mount, "run")
    config.num_train_steps = 15
    train.train_and_evaluate(config, workdir)  # Checkpoint 15 fits.
    filler = _fill(mount, 64 * 1024)
    config.num_train_steps = 40
    with pytest.raises(UserError) as error:
      train.train_and_evaluate(config, workdir)  # The save at 30 cannot be written.
    message = str(error.value)
    assert "No space left on device" in message and workdir in message and "step 15" in message
    assert "\n" not in message
    # It stopped at the step after the failed save (31, before its log line), not at the next save (40).
    assert _logged_step(workdir) == 30
    assert Checkpointer(workdir, read_only=True).all_steps() == [15]
    os.remove(filler)
    train.train_and_evaluate(config, workdir)  # Space freed: resumes from 15 and finishes.
    assert Checkpointer(workdir, read_only=True).latest_step() == 40


def test_a_save_that_failed_on_another_process_stops_this_one_too(config, tmp_path, monkeypatch):
  _, state, _ = one_device_run(config)
  iterator = pipeline.create_train_iterator(config)
  checkpointer = Checkpointer(str(tmp_path), max_to_keep=2)
  checkpointer.save(1, state, iterator, config.to_dict())
  checkpointer.wait()
  checkpointer.check_for_errors()  # This process's save is fine, and so are the others'.
  # The other process's flag, as the allgather would bring it: its save failed.
  monkeypatch.setattr(checkpoint_lib, "_on_any_process", lambda flag: True)
  with pytest.raises(UserError, match=r"saving a checkpoint to .*checkpoints failed on another process"):
    checkpointer.check_for_errors()
  assert checkpointer.all_steps() == [1]
  checkpointer.close()


def test_a_read_only_workdir_is_refused_before_any_work(trained, tmp_path):
  config, original = trained
  with _tmpfs(tmp_path / "ro", 64) as mount:
    workdir = os.path.join(mount, "run")
    shutil.copytree(original, workdir)
    subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
    with pytest.raises(UserError, match=r"--workdir .* is not writable \(Read-only file system\)"):
      train.train_and_evaluate(config, workdir)
    _assert_one_line_error(*_run("diffusion_jax.evaluate", f"--workdir={workdir}", "--num_samples=8",
                                 "--steps=2", "--nll_timesteps=-1"), "Read-only file system")
    # Reading a read-only workdir is fine: sample writes elsewhere.
    rc, err = _run("diffusion_jax.sample", f"--workdir={workdir}", "--num_per_prompt=1", "--steps=2",
                   f"--out={tmp_path / 'samples.npz'}")
    assert rc == 0, err
    assert os.path.isfile(tmp_path / "samples.npz")
