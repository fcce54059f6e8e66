"""Where sample, evaluate and export write, and the flags they refuse before loading a model.

Flag errors must come before any model loads, so those tests use a workdir holding only a config.json
(loading would fail with "no checkpoint"). Output paths and the evaluate merge use one tiny trained run.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion_jax import config as config_lib
from diffusion_jax import run_files
from tests.conftest import tiny_config
from tests.test_cli import REPO, _assert_one_line_error

SMALL_EVAL = ("--num_samples=8", "--steps=2", "--nll_timesteps=-1")


def _run(*args, data_dir=None):
  """(exit code, stdout, stderr lines) of `python -m <args>`."""
  env = dict(os.environ, DIFFUSION_JAX_DATA_DIR=data_dir) if data_dir else None
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  return proc.returncode, proc.stdout, proc.stderr.strip().splitlines()


def _refused(*args, fragments=()):
  rc, _, err = _run(*args)
  _assert_one_line_error(rc, err, *fragments)
  assert not any("no checkpoint" in l for l in err), err  # Refused before loading a model.


@pytest.fixture
def config_only(tmp_path):
  """A workdir with a config.json (T = 1000) and no checkpoint: anything that loads a model fails."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config_lib.to_json(config_lib.get_default_config()))
  return workdir


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A 2-step training run with a checkpoint at step 2."""
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  c = tiny_config(data_dir)
  c.num_train_steps = 2
  c.checkpoint_every_steps = 2
  c.sample_every_steps = 2
  c.eval_num_examples = 16
  train.train_and_evaluate(c, workdir)
  return workdir


# sample


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_sample_refuses_a_non_finite_guidance_scale(config_only, value):
  _refused("diffusion_jax.sample", f"--workdir={config_only}", f"--guidance_scale={value}",
           fragments=(f"--guidance_scale={value}", "finite"))


def test_sample_checks_the_out_directory_before_loading(config_only, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  _refused("diffusion_jax.sample", f"--workdir={config_only}", f"--out={a_file}/samples.npz",
           fragments=("--out directory", "a_file", "is not a directory"))


def test_sample_out_paths(trained, data_dir, tmp_path):
  common = ("diffusion_jax.sample", f"--workdir={trained}", "--prompts=3", "--num_per_prompt=1", "--steps=2")
  # No .npz suffix: appended, and the printed path is the real one.
  rc, out, err = _run(*common, f"--out={tmp_path / 'new' / 'noext'}", data_dir=data_dir)
  assert rc == 0, err[-20:]
  assert f"samples: {tmp_path / 'new' / 'noext.npz'}" in out and f"grid: {tmp_path / 'new' / 'noext.png'}" in out
  assert sorted(os.listdir(tmp_path / "new")) == ["noext.npz", "noext.png"]
  assert np.load(tmp_path / "new" / "noext.npz")["images"].shape == (1, 8, 8, 1)
  # An existing directory: samples.npz inside it, nothing beside it.
  (tmp_path / "dir").mkdir()
  rc, out, err = _run(*common, f"--out={tmp_path / 'dir'}", data_dir=data_dir)
  assert rc == 0, err[-20:]
  assert f"samples: {tmp_path / 'dir' / 'samples.npz'}" in out
  assert sorted(os.listdir(tmp_path / "dir")) == ["samples.npz", "samples.png"]
  assert sorted(os.listdir(tmp_path)) == ["dir", "new"]


# evaluate: flags and the output directory


@pytest.mark.parametrize("flag, fragments", [
    ("--guidance_scales=1,nan", ("--guidance_scales=1,nan", "finite")),
    ("--guidance_scales=inf", ("--guidance_scales=inf", "finite")),
    ("--guidance_scales=1,x", ("--guidance_scales=1,x", "does not parse", "e.g. 1,2,3,5")),
    ("--num_samples=1", ("--num_samples=1", ">= 4")),
    ("--batch_size=0", ("--batch_size=0", ">= 4")),
    ("--step=3 --all_steps", ("--step", "--all_steps")),
    ("--steps=0", ("--steps=0", "[1, 1000]")),
    ("--nll_timesteps=-5", ("--nll_timesteps=-5", "-1 (skip", "0 (all 1000", "[1, 1000]")),
    ("--nll_timesteps=1001", ("--nll_timesteps=1001", "[1, 1000]")),
])
def test_evaluate_refuses_bad_flags_before_loading(config_only, flag, fragments):
  _refused("diffusion_jax.evaluate", f"--workdir={config_only}", *flag.split(), fragments=fragments)
  assert not (config_only / "eval").exists()


@pytest.mark.parametrize("kind", ["training workdir", "export"])
def test_evaluate_checks_the_eval_directory_before_loading(config_only, kind):
  if kind == "export":
    (config_only / "export.json").write_text("{}")
  (config_only / "eval").write_text("a file in the way")
  _refused("diffusion_jax.evaluate", f"--workdir={config_only}", *SMALL_EVAL,
           fragments=("eval directory of --workdir", "is not a directory", "--out=PATH"))


def test_evaluate_checks_the_out_directory_before_loading(config_only, tmp_path):
  (tmp_path / "a_file").write_text("")
  _refused("diffusion_jax.evaluate", f"--workdir={config_only}", *SMALL_EVAL, f"--out={tmp_path}/a_file/m.json",
           fragments=("--out directory", "a_file", "is not a directory"))


# evaluate: merging into eval/<step>.json


def _settings(**changes):
  kwargs = dict(num_samples=50, steps=50, seed=0, nll_timesteps=100, nll_variance="fixed_large",
                feature_network="digits", reference="digits/train")
  return run_files.eval_settings(7, **{**kwargs, **changes})


def test_eval_settings_record_the_nll_settings_only_with_an_nll():
  assert list(_settings()) == ["step", "num_samples", "sampler", "steps", "seed", "feature_network", "reference",
                               "nll_timesteps", "nll_variance"]
  assert list(_settings(nll_timesteps=-1)) == ["step", "num_samples", "sampler", "steps", "seed",
                                               "feature_network", "reference"]
  assert _settings(nll_timesteps=0)["nll_timesteps"] == 0


def test_changed_settings():
  old = {**_settings(), "accuracy/template_0/guidance_1": 0.5}
  assert run_files.changed_settings(old, _settings()) == {}
  assert run_files.changed_settings(old, _settings(steps=20, seed=3)) == {"steps": (50, 20), "seed": (0, 3)}
  assert run_files.changed_settings(old, _settings(nll_variance="fixed_small")) == {
      "nll_variance": ("fixed_large", "fixed_small")}
  # Without an NLL now, the old NLL settings do not matter; without one before, the new ones do not conflict.
  assert run_files.changed_settings(old, _settings(nll_timesteps=-1)) == {}
  assert run_files.changed_settings(_settings(nll_timesteps=-1), _settings(nll_timesteps=0)) == {}
  assert run_files.changed_settings({}, _settings()) == {}


def test_merge_records_adds_and_updates_metrics_settings_first():
  old = {**_settings(nll_timesteps=-1), "classifier_test_accuracy": 0.99,
         "accuracy/template_0/guidance_1": 0.2, "accuracy/template_0/guidance_3": 0.5}
  new = {**_settings(), "classifier_test_accuracy": 0.99, "accuracy/template_0/guidance_3": 0.6,
         "accuracy/template_0/guidance_5": 0.7, "nll_bits_per_dim": 4.0}
  merged = run_files.merge_records(old, new)
  assert list(merged)[:9] == list(run_files.SETTINGS)
  assert merged["accuracy/template_0/guidance_1"] == 0.2
  assert merged["accuracy/template_0/guidance_3"] == 0.6
  assert merged["accuracy/template_0/guidance_5"] == 0.7
  assert merged["nll_bits_per_dim"] == 4.0 and merged["nll_timesteps"] == 100
  assert run_files.merge_records({}, new) == new


def test_evaluate_merges_refuses_overwrites(trained, data_dir, tmp_path):
  path = os.path.join(trained, "eval", "2.json")
  common = ("diffusion_jax.evaluate", f"--workdir={trained}", "--num_samples=8", "--nll_timesteps=-1")

  def evaluate_ok(*args):
    rc, out, err = _run(*common, *args, data_dir=data_dir)
    assert rc == 0, err[-20:]
    return out

  def read(p=path):
    with open(p) as f:
      return json.load(f)

  accuracy = lambda record: sorted(k for k in record if k.startswith("accuracy/"))
  evaluate_ok("--steps=2", "--guidance_scales=1,3")
  out = evaluate_ok("--steps=2", "--guidance_scales=5")
  assert f"metrics: {path}" in out
  record = read()
  assert list(record)[:7] == ["step", "num_samples", "sampler", "steps", "seed", "feature_network", "reference"]
  assert (record["step"], record["num_samples"], record["steps"]) == (2, 8, 2)
  assert (record["feature_network"], record["reference"]) == ("digits", "digits/train")
  assert accuracy(record) == [f"accuracy/template_0/guidance_{s}" for s in (1, 3, 5)]
  assert "classifier_test_accuracy" in record

  # Other settings: refused with the differences and the ways out; the file stays as it was.
  rc, _, err = _run(*common, "--steps=3", "--seed=4", data_dir=data_dir)
  _assert_one_line_error(rc, err, "2.json", "steps (2 there, 3 now)", "seed (0 there, 4 now)",
                         "--overwrite", "--out=PATH")
  assert read() == record
  # --out writes elsewhere (a directory gets <step>.json), --overwrite replaces the file.
  (tmp_path / "elsewhere").mkdir()
  evaluate_ok("--steps=3", "--guidance_scales=1", f"--out={tmp_path / 'elsewhere'}")
  assert read(tmp_path / "elsewhere" / "2.json")["steps"] == 3
  assert read() == record
  evaluate_ok("--steps=3", "--guidance_scales=1", "--overwrite")
  assert read()["steps"] == 3 and accuracy(read()) == ["accuracy/template_0/guidance_1"]
  # Without --sampler and --steps, the run's own config.sampling (the smoke config: DDIM, 5 steps).
  evaluate_ok("--guidance_scales=1", "--overwrite")
  assert (read()["sampler"], read()["steps"]) == ("ddim", 5)
  assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]


# export


def test_export_refuses_to_write_into_a_training_run(config_only, tmp_path):
  other = tmp_path / "other_run"
  (other / "checkpoints").mkdir(parents=True)
  (other / "config.json").write_text("{}")
  os.symlink(config_only, tmp_path / "link")
  for out, fragment in [(config_only, "is the training workdir itself"),
                        (f"{config_only}/", "is the training workdir itself"),
                        (tmp_path / "link", "is the training workdir itself"),
                        (config_only / "checkpoints", "writes into the checkpoints directory"),
                        (config_only / "checkpoints" / "2" / "x", "writes into the checkpoints directory"),
                        (other, "is a training workdir")]:
    _refused("diffusion_jax.export", f"--workdir={config_only}", f"--out={out}", fragments=(fragment,))
  assert sorted(os.listdir(config_only)) == ["config.json"]


def test_export_into_a_subdirectory_of_the_workdir_is_allowed(config_only):
  # It passes the --out checks and gets as far as loading (which fails: there is no checkpoint).
  rc, _, err = _run("diffusion_jax.export", f"--workdir={config_only}", f"--out={config_only / 'export'}")
  _assert_one_line_error(rc, err, "no checkpoint in")
