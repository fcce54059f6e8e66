"""The README's main job, shortened: train on digits via the CLI, sample with guidance, evaluate.

Guided samples must show the prompted digit far above chance (10%) after a few hundred steps.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 600


def _run(data_dir, *args):
  env = dict(os.environ, DIFFUSION_JAX_DATA_DIR=data_dir)
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_train_sample_evaluate(data_dir, tmp_path):
  workdir = str(tmp_path / "digits")
  _run(data_dir, "diffusion_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
       f"--config.num_train_steps={STEPS}", "--config.sample_every_steps=300", "--config.eval.every_steps=0",
       "--config.checkpoint_every_steps=300")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["300", "600"]

  out = str(tmp_path / "samples.npz")
  stdout = _run(data_dir, "diffusion_jax.sample", f"--workdir={workdir}", "--prompts=the number seven;3",
                "--num_per_prompt=4", "--guidance_scale=3", "--steps=20", "--seed=5", f"--out={out}")
  assert f"grid: {out[:-4]}.png" in stdout
  samples = np.load(out)
  assert samples["images"].shape == (8, 8, 8, 1) and samples["images"].dtype == np.uint8
  assert list(samples["prompts"]) == ["the number seven"] * 4 + ["3"] * 4
  assert float(samples["guidance_scale"]) == 3.0 and int(samples["seed"]) == 5

  # A step that does not exist is a one-line error; an export of the EMA parameters samples the same images.
  proc = subprocess.run([sys.executable, "-m", "diffusion_jax.sample", f"--workdir={workdir}", "--step=450"],
                        cwd=REPO, env=dict(os.environ, DIFFUSION_JAX_DATA_DIR=data_dir), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 2 and "error: checkpoint step 450 does not exist" in proc.stderr
  assert "available steps: [300, 600]" in proc.stderr
  exported = str(tmp_path / "export")
  _run(data_dir, "diffusion_jax.export", f"--workdir={workdir}", f"--out={exported}")
  assert sorted(os.listdir(exported)) == ["config.json", "export.json", "params"]
  out_exported = str(tmp_path / "from_export.npz")
  _run(data_dir, "diffusion_jax.sample", f"--workdir={exported}", "--prompts=the number seven;3",
       "--num_per_prompt=4", "--guidance_scale=3", "--steps=20", "--seed=5", f"--out={out_exported}")
  np.testing.assert_array_equal(np.load(out_exported)["images"], samples["images"])
  assert int(np.load(out_exported)["step"]) == STEPS

  _run(data_dir, "diffusion_jax.evaluate", f"--workdir={workdir}", "--guidance_scales=1,3",
       "--num_samples=200", "--steps=25")
  with open(os.path.join(workdir, "eval", f"{STEPS}.json")) as f:
    metrics = json.load(f)
  print(metrics)
  assert metrics["classifier_test_accuracy"] > 0.97
  for metric in ("fd", "kid", "precision", "recall", "is"):  # In the digits features; values: README.
    assert np.isfinite(metrics[f"{metric}/template_0/guidance_3"]), metric
  # Measured at 600 steps: 0.925 at guidance 3, 0.63 at guidance 1; chance is 0.10.
  assert metrics["accuracy/template_0/guidance_3"] >= 0.8
  assert metrics["accuracy/template_0/guidance_3"] > metrics["accuracy/template_0/guidance_1"]  # Guidance helps.
