"""The README's main job, shortened: train on digits via the CLI, sample with guidance, export, evaluate.

Guided samples must show the prompted digit far above chance (10%) after a few hundred steps. The
workdir is a URL (`fake://bucket/digits`) that the path layer maps onto a local directory (as it would
map gs:// onto Cloud Storage): every file of the run must land there, and nothing anywhere else.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 600


def _env(data_dir, bucket_root):
  # Compiled at XLA's default optimization level, as users run it (tests/conftest.py lowers it elsewhere):
  # 600 training steps would take longer than the compiles it saves.
  return dict(os.environ, DIFFUSION_JAX_DATA_DIR=data_dir, DIFFUSION_JAX_URL_FAKES=f"fake={bucket_root}",
              PYTHONPATH=REPO, XLA_FLAGS=xla_flags(fast_compile=False))


def _run(env, cwd, *args):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.slow
def test_train_sample_evaluate(data_dir, tmp_path):
  bucket_root, cwd = tmp_path / "fake_bucket", tmp_path / "cwd"
  cwd.mkdir()
  env, config = _env(data_dir, bucket_root), os.path.join(REPO, "configs", "digits.py")
  url, local = "fake://bucket/digits", bucket_root / "bucket" / "digits"
  _run(env, cwd, "diffusion_jax.main", f"--config={config}", f"--workdir={url}",
       f"--config.num_train_steps={STEPS}", "--config.sample_every_steps=300", "--config.eval.every_steps=0",
       "--config.checkpoint_every_steps=300")
  assert sorted(os.listdir(local / "checkpoints")) == ["300", "600"]

  out = str(tmp_path / "samples.npz")
  stdout = _run(env, cwd, "diffusion_jax.sample", f"--workdir={url}", "--prompts=the number seven;3",
                "--num_per_prompt=4", "--guidance_scale=3", "--steps=20", "--seed=5", f"--out={out}")
  assert f"grid: {out[:-4]}.png" in stdout
  samples = np.load(out)
  assert samples["images"].shape == (8, 8, 8, 1) and samples["images"].dtype == np.uint8
  assert list(samples["prompts"]) == ["the number seven"] * 4 + ["3"] * 4
  assert float(samples["guidance_scale"]) == 3.0 and int(samples["seed"]) == 5

  # A step that does not exist is a one-line error; an export of the EMA parameters samples the same images.
  proc = subprocess.run([sys.executable, "-m", "diffusion_jax.sample", f"--workdir={url}", "--step=450"],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and "error: checkpoint step 450 does not exist" in proc.stderr
  assert "available steps: [300, 600]" in proc.stderr
  _run(env, cwd, "diffusion_jax.export", f"--workdir={url}", "--out=fake://bucket/export")
  assert sorted(os.listdir(bucket_root / "bucket" / "export")) == ["config.json", "export.json", "params"]
  _run(env, cwd, "diffusion_jax.sample", "--workdir=fake://bucket/export", "--prompts=the number seven;3",
       "--num_per_prompt=4", "--guidance_scale=3", "--steps=20", "--seed=5", "--out=fake://bucket/from_export")
  from_export = np.load(bucket_root / "bucket" / "from_export.npz")
  np.testing.assert_array_equal(from_export["images"], samples["images"])
  assert int(from_export["step"]) == STEPS

  _run(env, cwd, "diffusion_jax.evaluate", f"--workdir={url}", "--guidance_scales=1,3",
       "--num_samples=200", "--steps=25")
  metrics = json.loads((local / "eval" / f"{STEPS}.json").read_text())
  print(metrics)
  assert metrics["classifier_test_accuracy"] > 0.97
  for metric in ("fd", "kid", "precision", "recall", "is"):  # In the digits features; values: README.
    assert np.isfinite(metrics[f"{metric}/template_0/guidance_3"]), metric
  # Measured at 600 steps: 0.925 at guidance 3, 0.63 at guidance 1; chance is 0.10.
  assert metrics["accuracy/template_0/guidance_3"] >= 0.8
  assert metrics["accuracy/template_0/guidance_3"] > metrics["accuracy/template_0/guidance_1"]  # Guidance helps.

  # Every file of the run went through the path layer: all under the fake bucket, none in the working
  # directory (where a path joined onto the raw URL would land, e.g. as ./fake:/bucket/...).
  assert os.listdir(cwd) == []
  files = _files(local)
  for expected in ("config.json", "metrics.jsonl", "samples/step_300.png", "samples/step_600.png",
                   f"eval/{STEPS}.json", f"eval/{STEPS}_sweep.png"):
    assert expected in files, (expected, files)
  assert any(f.startswith("events.out.tfevents.") for f in files), files  # TensorBoard.
  assert any(f.startswith(f"eval/{STEPS}_") and f.endswith(".png") and "sweep" not in f for f in files), files
  assert any(f.startswith("checkpoints/600/state/") for f in files), files
  assert not any(".tmp" in f for f in files), files  # Atomic writes leave no temporaries.
  assert sorted(os.listdir(bucket_root / "bucket")) == ["digits", "export", "from_export.npz", "from_export.png"]
