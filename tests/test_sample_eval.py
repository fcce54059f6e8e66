"""Streamed sample evaluation: ground truth on real data, sharding, the evaluate job, periodic evaluation.

The metrics themselves are tested against closed forms in test_fid_metrics.py, the feature networks in
test_inception.py and test_digit_features.py; here the pieces are tested together on the digits.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from diffusion_jax import build
from diffusion_jax.errors import UserError
from diffusion_jax.metrics import features, fid, sample_eval
from tests.conftest import tiny_config, xla_flags
from tests.test_cli import REPO, _assert_one_line_error


def _run(*args):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
  return proc.returncode, proc.stdout, proc.stderr.strip().splitlines()


@pytest.fixture(scope="module")
def digits_run(data_dir):
  return build.build(tiny_config(data_dir))


@pytest.fixture(scope="module")
def featurizer(digits_run):
  return sample_eval.Featurizer(features.get("digits"), digits_run.mesh, batch_size=256)


def _real_images(split):
  from diffusion_jax.data.builders import digits  # pylint: disable=g-import-not-at-top
  images, _ = digits.load_raw_digits()
  return images[digits.split_indices()[split]]


def test_fd_of_real_data_is_zero_against_itself_and_grows_with_noise(digits_run, featurizer, tmp_path):
  reference = sample_eval.reference_statistics(digits_run, featurizer, split="train", cache=str(tmp_path))
  assert int(reference.metadata["num_images"]) == len(_real_images("train"))

  def fd(images):
    stats = fid.RunningStats(featurizer.network.dim).update(featurizer(images)[0])
    return fid.frechet_distance(stats.mean(), stats.covariance(), reference.mu, reference.sigma)

  assert fd(_real_images("train")) < 1e-6  # The same images, read by the pipeline vs. directly.
  test = _real_images("test").astype(np.float64)
  rng = np.random.default_rng(0)
  noise = rng.standard_normal(test.shape)
  distances = [fd(np.clip(test + sigma * noise, 0, 255).round().astype(np.uint8)) for sigma in (0, 16, 32, 64, 128)]
  print("FD of the test split (+ noise) to the train split:", distances)
  # Held-out real digits are close to the training digits (what remains is the bias of 297 samples in 128-d).
  assert distances[0] < 0.1 * distances[-1]
  assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_reference_statistics_are_cached_and_a_damaged_cache_is_recomputed(digits_run, featurizer, tmp_path,
                                                                           monkeypatch):
  first = sample_eval.reference_statistics(digits_run, featurizer, split="test", cache=str(tmp_path))
  (path,) = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path) for f in fs]
  assert featurizer.network.fingerprint in path and path.endswith(".npz")
  from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  def fail(*args, **kwargs):
    raise AssertionError("the cached statistics should have been used")

  with monkeypatch.context() as m:
    m.setattr(pipeline, "iterate_split", fail)
    cached = sample_eval.reference_statistics(digits_run, featurizer, split="test", cache=str(tmp_path))
  np.testing.assert_array_equal(cached.mu, first.mu)
  np.testing.assert_array_equal(cached.features, first.features)
  with open(path, "wb") as f:
    f.write(b"not an npz")
  again = sample_eval.reference_statistics(digits_run, featurizer, split="test", cache=str(tmp_path))
  np.testing.assert_allclose(again.sigma, first.sigma, rtol=1e-12)
  assert fid.load_stats(path).mu.shape == first.mu.shape  # Rewritten.


def test_settings_and_metric_keys():
  assert [s.name for s in sample_eval.settings_for("text", [1, 3], [0, 2])] == [
      "template_0/guidance_1", "template_0/guidance_3", "template_2/guidance_1", "template_2/guidance_3"]
  assert [s.name for s in sample_eval.settings_for("class", [1.5])] == ["guidance_1.5"]
  (uncond,) = sample_eval.settings_for("none", [1, 3])
  assert sample_eval.metric_key("fd", uncond) == "fd"


def test_evaluation_is_deterministic_and_the_same_on_8_devices(twenty_steps, tmp_path):
  config, workdir, _ = twenty_steps
  script = tmp_path / "evaluate.py"
  script.write_text(
      "import json, sys\n"
      "from diffusion_jax import generation, inference\n"
      "from diffusion_jax.metrics import sample_eval\n"
      "loaded = inference.load(sys.argv[1])\n"
      "options = generation.sampler_options(loaded.config, num_steps=4)\n"
      "ev = sample_eval.create_evaluator(loaded.run, feature_network='digits', inception_weights='', cache='',\n"
      "    num_samples=40, batch_size=16, options=options, seed=3)\n"
      "results = ev.evaluate(loaded.params, sample_eval.settings_for('text', [1, 3]))\n"
      "print(json.dumps({k: v for r in results for k, v in r.metrics.items()}))\n")

  def evaluate(num_devices):
    env = dict(os.environ, XLA_FLAGS=xla_flags(num_devices),
               DIFFUSION_JAX_DATA_DIR=config.dataset.data_dir, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, str(script), workdir], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

  one, eight = evaluate(1), evaluate(8)
  assert set(one) == set(eight) and "fd/template_0/guidance_3" in one and "accuracy/template_0/guidance_1" in one
  for key in one:
    assert eight[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
  assert one["fd/template_0/guidance_1"] != one["fd/template_0/guidance_3"]


def test_programs_compiled_ahead_on_other_threads_are_the_ones_evaluation_runs(twenty_steps):
  """evaluate compiles the guided and unguided samplers and the NLL bound on two threads while it loads the
  checkpoint: evaluating must then compile none of them again, and give what a fresh bound gives."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import generation, inference  # pylint: disable=g-import-not-at-top
  from diffusion_jax.metrics import sample_quality  # pylint: disable=g-import-not-at-top
  _, workdir, _ = twenty_steps
  loaded = inference.load(workdir)
  evaluator = sample_eval.create_evaluator(
      loaded.run, feature_network="digits", inception_weights="", cache="", num_samples=8, batch_size=8,
      options=generation.sampler_options(loaded.config, num_steps=3), seed=0)
  bound = sample_quality.NllBound(loaded.run, num_timesteps=3)
  settings = sample_eval.settings_for("text", [1, 3])
  compiled = []

  def listener(event, duration, fun_name="", **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration" and fun_name in ("jit(sample_and_featurize)",
                                                                              "jit(batch_bpd)"):
      compiled.append(fun_name[4:-1])

  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), loaded.params)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
      for future in [pool.submit(c) for c in evaluator.compile(abstract, settings)
                     + [functools.partial(bound.compile, abstract)]]:
        future.result()
    ahead = sorted(compiled)
    results = evaluator.evaluate(loaded.params, settings)
    nll = bound(loaded.params)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert ahead == ["batch_bpd", "sample_and_featurize", "sample_and_featurize"]  # Guided, unguided, the bound.
  assert sorted(compiled) == ahead
  assert [r.setting for r in results] == settings and all(np.isfinite(list(r.metrics.values())).all() for r in results)
  assert nll == sample_quality.nll_bits_per_dim(loaded, num_timesteps=3)


def test_evaluate_all_steps_writes_records_grids_plot_and_tensorboard(twenty_steps, tmp_path):
  config, original, _ = twenty_steps
  workdir = str(tmp_path / "run")
  shutil.copytree(original, workdir)
  common = ("diffusion_jax.evaluate", f"--workdir={workdir}", "--num_samples=24", "--batch_size=12", "--steps=3",
            "--nll_timesteps=-1")
  rc, out, err = _run(*common, "--all_steps", "--guidance_scales=1,3,5")
  assert rc == 0, err[-20:]
  eval_dir = os.path.join(workdir, "eval")
  files = sorted(os.listdir(eval_dir))
  for step in (10, 20):
    assert f"{step}.json" in files and f"{step}_sweep.png" in files
    assert all(f"{step}_template_0_guidance_{s}.png" in files for s in (1, 3, 5))
    with open(os.path.join(eval_dir, f"{step}.json")) as f:
      record = json.load(f)
    for metric in ("fd", "kid", "kid_std", "precision", "recall", "is", "is_std", "accuracy"):
      for s in (1, 3, 5):
        assert np.isfinite(record[f"{metric}/template_0/guidance_{s}"]), (metric, s)
    assert 0 <= record["precision/template_0/guidance_3"] <= 1
  assert any(f.startswith("events.out.tfevents") for f in files)
  assert "progress" not in out  # Progress goes to the log (stderr), the record to stdout.

  # Nothing left to do: the records are untouched. --watch on a finished run also returns at once.
  before = {f: os.path.getmtime(os.path.join(eval_dir, f)) for f in files if f.endswith(".json")}
  for flag in ("--all_steps", "--watch"):
    rc, _, err = _run(*common, flag, "--guidance_scales=1,3,5")
    assert rc == 0, err[-20:]
  assert before == {f: os.path.getmtime(os.path.join(eval_dir, f)) for f in before}


def test_evaluate_refuses_bad_inputs_in_one_line(twenty_steps, tmp_path):
  """(Unparsable scales and other flag errors: test_cli_outputs.py; bad weight files: test_inception.py.)"""
  config, workdir, _ = twenty_steps
  small = ("diffusion_jax.evaluate", f"--workdir={workdir}", "--num_samples=8", "--steps=2", "--nll_timesteps=-1",
           f"--out={tmp_path / 'metrics'}/")
  wrong_dim = tmp_path / "stats_2048.npz"
  fid.save_stats(str(wrong_dim), np.zeros(2048), np.eye(2048))
  cases = [
      (("--reference_stats=" + str(wrong_dim),), ("stats_2048.npz", "2048", str(features.get("digits").dim))),
      (("--feature_network=inception",), ("--inception_weights=PATH", "pt_inception-2015-12-05")),
      (("--feature_network=inception", f"--inception_weights={tmp_path / 'nope.pth'}"), ("nope.pth",)),
  ]
  for args, fragments in cases:
    _assert_one_line_error(*_run(*small, *args)[::2], *fragments)
  empty = tmp_path / "empty_run"
  shutil.copytree(workdir, empty, ignore=shutil.ignore_patterns("checkpoints"))
  _assert_one_line_error(*_run("diffusion_jax.evaluate", f"--workdir={empty}")[::2], "no checkpoint", "train first")


def test_config_refuses_periodic_inception_evaluation_without_weights(data_dir):
  from diffusion_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir)
  config.eval.every_steps = 10
  config.eval.feature_network = "inception"
  with pytest.raises(UserError, match="config.eval.inception_weights"):
    config_lib.validate(config)
  config.eval.feature_network = "digits"
  config.eval.num_samples = 1
  with pytest.raises(UserError, match=r"num_samples=1 must be >= 4"):
    config_lib.validate(config)


def test_training_evaluates_sample_quality_periodically(data_dir, tmp_path):
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir)
  config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 8, 4, 8
  config.eval_num_examples = 16
  config.sampling.num_steps = 3
  config.eval.every_steps, config.eval.num_samples, config.eval.guidance_scales = 4, 20, (1.0, 3.0)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  evaluated = {r["step"]: r for r in rows if "sample_eval/fd/template_0/guidance_3" in r}
  assert sorted(evaluated) == [4, 8]
  for row in evaluated.values():
    assert np.isfinite(row["sample_eval/fd/template_0/guidance_1"])
    assert 0 <= row["sample_eval/accuracy/template_0/guidance_3"] <= 1


def test_follow_checkpoints_evaluates_each_new_checkpoint_until_the_last_step(monkeypatch, tmp_path):
  from diffusion_jax import inference  # pylint: disable=g-import-not-at-top
  listings = iter([[10], [10], [10, 20], [20, 30], [20, 30]])  # Training writes 20, 30; rotation drops 10.
  monkeypatch.setattr(inference, "checkpoint_steps", lambda path: next(listings))
  done, sleeps = set(), []
  evaluated = inference.follow_checkpoints(str(tmp_path), 30, is_done=done.__contains__, evaluate=done.add,
                                           follow=True, poll_seconds=7, timeout=1e9, sleep=sleeps.append)
  assert evaluated == [10, 20, 30] and sleeps == [7, 7, 7]

  # Without --watch: one pass. A run that stops writing: the timeout ends the wait.
  monkeypatch.setattr(inference, "checkpoint_steps", lambda path: [10])
  assert inference.follow_checkpoints(str(tmp_path), 30, is_done=lambda s: False, evaluate=lambda s: None,
                                      follow=False, poll_seconds=0, timeout=0) == [10]
  damaged = []  # A step whose evaluation fails every time is tried once, not at every look.
  assert inference.follow_checkpoints(str(tmp_path), 30, is_done=lambda s: False, evaluate=damaged.append,
                                      follow=True, poll_seconds=0, timeout=0.05, sleep=lambda s: None) == [10]
  assert damaged == [10]


def test_unknown_feature_networks_and_unreadable_images_are_refused():
  with pytest.raises(UserError, match=r"unknown feature network 'bogus'; choose one of inception, digits"):
    features.get("bogus")
  with pytest.raises(UserError, match=r"reads 8×8×1 images; these are \(32, 32, 3\)"):
    features.check_images("digits", (32, 32, 3))
  with pytest.raises(UserError, match="grey or RGB"):
    features.check_images("inception", (8, 8, 4))
