"""Two local processes joined by jax.distributed (gloo) train exactly like one process.

The same global batch is split over the processes (each reads only its rows), so the losses and the
final parameters must match the single-process run up to the order of float summation.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax.inference import load
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/smoke.py", "--config.num_train_steps=6", "--config.log_every_steps=3",
        "--config.checkpoint_every_steps=6", "--config.sample_every_steps=6",
        # Sample evaluation at step 6: samples sharded over both processes' devices, features gathered.
        "--config.eval.every_steps=6", "--config.eval.num_samples=24", "--config.eval.batch_size=8",
        "--config.sampling.num_steps=3"]


def _rows(workdir):
  """The complete rows of metrics.jsonl (a running job may be half-way through writing the last one)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _losses(workdir):
  return [r["loss"] for r in _rows(workdir) if "loss" in r]


def _sample_metrics(workdir):
  return {k: v for r in _rows(workdir) for k, v in r.items() if k.startswith("sample_eval/")}


@pytest.mark.slow
def test_two_processes_train_like_one(data_dir, tmp_path):
  env = dict(os.environ, DIFFUSION_JAX_DATA_DIR=data_dir, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  subprocess.run([sys.executable, "-m", "diffusion_jax.main", f"--workdir={one}", *ARGS], cwd=REPO, env=env,
                 check=True, capture_output=True, timeout=600)
  proc = subprocess.run([sys.executable, "-m", "launch.local", f"--workdir={two}", *ARGS], cwd=REPO,
                        env=dict(env, NUM_PROCESSES="2"), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Process 1 of 2" in proc.stderr and "Process 0 of 2" in proc.stderr
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
  assert len(_losses(one)) == 2
  one_metrics, two_metrics = _sample_metrics(one), _sample_metrics(two)
  assert "sample_eval/fd/template_0/guidance_3" in one_metrics and set(one_metrics) == set(two_metrics)
  for key, value in one_metrics.items():
    assert two_metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
  params_one, params_two = load(one).params, load(two).params
  for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_state_initialized_on_each_host_is_laid_out_over_all_processes():
  """Two processes, 2 devices each, fsdp over all 4: each process runs the initializer on its host CPU and
  places its devices' slices (what a multi-host accelerator job does). The global state is the host
  program's bits, within one float32 ulp of the state initialized on the devices (the last bit of a
  fused scale differs, as in tests/test_parallel.py); a flipped bit on one process fails the CRC check
  on both, and then both initialize on the devices with threefry's draws, as they do where their host
  draws differ on the device path."""
  from launch import local  # pylint: disable=g-import-not-at-top
  port = local._free_port()  # pylint: disable=protected-access
  procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "multiprocess_init_check.py")], cwd=REPO,
                            env=dict(os.environ, **local.process_env(i, 2, 2, port)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  report = json.loads([l for l in outputs[0][0].splitlines() if l.startswith("REPORT ")][0][len("REPORT "):])
  assert report["processes"] == 2 and report["devices"] == 4 and report["leaves"] > 100, report
  assert report["split_leaves"] > 10 and report["same_shardings"], report  # Really laid out over both.
  assert report["bit_identical_to_one_device"], report
  assert report["max_abs_diff_to_on_devices"] < 1.2e-7, report  # One float32 ulp of a value below 1.
  assert report["equal_trees_pass"] and report["one_flipped_bit_fails"], report
  # As logged: each process draws, and the processes compare their state (host) or draws (devices).
  assert report["host_phases"] == ["trace", "draw", "compile", "run", "compare", "place", "fill"], report
  assert report["device_phases"] == ["trace", "draw", "compare", "compile", "place", "run"], report
  assert report["fallback_checked_once"] and report["fallback_bit_identical_to_threefry_on_devices"], report
  assert report["threefry_differs"], report
  assert report["device_fallback_checked_once"] and report["device_fallback_bit_identical_to_threefry"], report
  assert report["agreed_limit_on_cpus"] is None, report
  assert report["agreed_limit"] == report["agreed_limit_one_reports"] == 70 * 2**30, report
  assert report["same_report_on_all_processes"], report


def _child_with_process_id(launcher_pid, process_id):
  """The PID of the training process that the launcher started with DIFFUSION_JAX_PROCESS_ID=process_id."""
  children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
  for pid in children:
    with open(f"/proc/{pid}/environ", "rb") as f:
      if f"DIFFUSION_JAX_PROCESS_ID={process_id}".encode() in f.read().split(b"\0"):
        return int(pid)
  raise AssertionError(f"no child of {launcher_pid} has process id {process_id}")


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_all_and_exits_cleanly(data_dir, tmp_path):
  """The preemption notice reaches one process; all processes agree on a step, save it and exit 0."""
  env = dict(os.environ, DIFFUSION_JAX_DATA_DIR=data_dir, JAX_PLATFORMS="cpu", NUM_PROCESSES="2", XLA_FLAGS=xla_flags())
  workdir = str(tmp_path / "preempted")
  args = ["--config=configs/smoke.py", "--config.num_train_steps=400", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=1000", "--config.sample_every_steps=1000",
          "--config.eval_num_examples=16"]
  with open(tmp_path / "log.txt", "w+") as log:
    launcher = subprocess.Popen([sys.executable, "-m", "launch.local", f"--workdir={workdir}", *args], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(workdir, "metrics.jsonl")) or len(_losses(workdir)) < 20:
      assert launcher.poll() is None and time.time() < deadline
      time.sleep(0.05)
    os.kill(_child_with_process_id(launcher.pid, 1), signal.SIGTERM)  # Not the process that logs.
    assert launcher.wait(timeout=300) == 0
    log.seek(0)
    output = log.read()
  saved = re.findall(r"saving a checkpoint at step (\d+) and stopping", output)
  assert len(saved) == 2 and saved[0] == saved[1], output[-3000:]  # Both processes, the same step.
  step = int(saved[0])
  assert 20 <= step < 400
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
  assert load(workdir).step == step
