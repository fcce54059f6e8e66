"""Two local processes joined by jax.distributed (gloo) train exactly like one process.

The same global batch is split over the processes (each reads only its rows), so the losses and the
final parameters must match the single-process run up to the order of float summation.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion_jax.inference import load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/smoke.py", "--config.num_train_steps=6", "--config.log_every_steps=3",
        "--config.checkpoint_every_steps=6", "--config.sample_every_steps=6"]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_two_processes_train_like_one(data_dir, tmp_path):
  env = dict(os.environ, DIFFUSION_JAX_DATA_DIR=data_dir, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  subprocess.run([sys.executable, "-m", "diffusion_jax.main", f"--workdir={one}", *ARGS], cwd=REPO, env=env,
                 check=True, capture_output=True, timeout=600)
  proc = subprocess.run(["bash", "launch/local_multiprocess.sh", f"--workdir={two}", *ARGS], cwd=REPO,
                        env=dict(env, NUM_PROCESSES="2", PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Process 1 of 2" in proc.stderr and "Process 0 of 2" in proc.stderr
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
  assert len(_losses(one)) == 2
  params_one, params_two = load(one).params, load(two).params
  for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
    np.testing.assert_allclose(a, b, atol=1e-5)
