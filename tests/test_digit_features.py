"""The digits feature network: deterministic training, accuracy, on-disk cache, meaningful features, input checks.

Trains in full twice: once in this process (`trained`) and once in a fresh process that writes the cache
(`cache_dir`), so equal weights also show that the cache a process writes matches what another computes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.data.builders import digits
from diffusion_jax.errors import UserError
from diffusion_jax.metrics import digit_features

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_same_variables(a, b):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [path for path, _ in flat_a] == [path for path, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert x.tobytes() == y.tobytes(), f"{path} differs"  # Bit-identical, not merely close.


def _forbid_training(monkeypatch):
  def fail(seed=0):
    raise AssertionError(f"train(seed={seed}) was called")
  monkeypatch.setattr(digit_features, "train", fail)


@pytest.fixture(scope="module")
def trained():
  """(variables, test accuracy) of `train(seed=0)` in this process."""
  return digit_features.train(seed=0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A directory whose cache a fresh process wrote with `load_or_train` (so it trained from scratch)."""
  path = str(tmp_path_factory.mktemp("features") / "cache")
  code = ("import sys; from diffusion_jax.metrics import digit_features as f; "
          "_, acc = f.load_or_train(sys.argv[1]); print('accuracy', acc)")
  result = subprocess.run([sys.executable, "-c", code, path], cwd=_ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return path


@pytest.fixture
def real_split():
  images, labels = digits.load_raw_digits()
  split = digits.split_indices()
  return {name: (images[split[name]], labels[split[name]]) for name in ("train", "test")}


def test_training_is_deterministic_across_processes(trained, cache_dir, monkeypatch):
  _forbid_training(monkeypatch)
  variables, accuracy = digit_features.load_or_train(cache_dir)
  _assert_same_variables(variables, trained[0])
  assert accuracy == trained[1]
  assert digit_features.fingerprint(variables) == digit_features.fingerprint(trained[0])


def test_another_seed_gives_other_weights(monkeypatch):
  # A few steps show the seed's effect without a third full training.
  monkeypatch.setattr(digit_features, "NUM_STEPS", 5)
  a, _ = digit_features.train(seed=0)
  b, _ = digit_features.train(seed=1)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    if x.ndim == 2:  # Kernels (biases may all start at zero).
      assert not np.array_equal(np.asarray(x), np.asarray(y))
  assert digit_features.fingerprint(a) != digit_features.fingerprint(b)


def test_test_accuracy(trained, real_split):
  variables, accuracy = trained
  print(f"digit feature network test accuracy: {accuracy:.4f}")
  assert accuracy >= 0.97
  images, labels = real_split["test"]
  _, logits = digit_features.apply(variables, jnp.asarray(images))
  assert float(np.mean(np.argmax(np.asarray(logits), -1) == labels)) == accuracy


def test_features_separate_the_classes(trained, real_split):
  variables, _ = trained
  (train_images, train_labels), (test_images, test_labels) = real_split["train"], real_split["test"]
  train_features = np.asarray(digit_features.apply(variables, train_images)[0], np.float64)
  test_features = np.asarray(digit_features.apply(variables, test_images)[0], np.float64)
  means = np.stack([train_features[train_labels == c].mean(0) for c in range(10)])  # [10, FEATURE_DIM]
  distances = np.linalg.norm(test_features[:, None] - means[None], axis=-1)  # [N, 10]
  assert np.mean(distances.argmin(-1) == test_labels) >= 0.95  # Nearest class mean.
  own = distances[np.arange(len(test_labels)), test_labels]
  others = (distances.sum(-1) - own) / 9
  for c in range(10):
    assert own[test_labels == c].mean() < others[test_labels == c].mean(), f"class {c}"


def test_apply_contract(trained, real_split):
  variables, _ = trained
  images = real_split["test"][0][:7]
  features, logits = digit_features.apply(variables, images)
  assert features.shape == (7, digit_features.FEATURE_DIM) and features.dtype == jnp.float32
  assert logits.shape == (7, 10) and logits.dtype == jnp.float32
  as_float = digit_features.apply(variables, jnp.asarray(images, jnp.float32))
  jitted = jax.jit(digit_features.apply)(variables, jnp.asarray(images))
  for other in (as_float, jitted):
    np.testing.assert_allclose(np.asarray(other[0]), np.asarray(features), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 8, 8, 3), (8, 8, 1), (4, 64), (4, 16, 16, 1)])
def test_apply_rejects_other_shapes(trained, shape):
  images = jnp.zeros(shape, jnp.uint8)
  with pytest.raises(UserError, match=r"\[N, 8, 8, 1\].*got shape"):
    digit_features.apply(trained[0], images)
  with pytest.raises(UserError, match=r"\[N, 8, 8, 1\]"):
    jax.jit(digit_features.apply)(trained[0], images)


def test_fingerprint_is_short_stable_hex_and_follows_the_weights(trained):
  variables, _ = trained
  fp = digit_features.fingerprint(variables)
  assert len(fp) == 16 and int(fp, 16) >= 0
  assert digit_features.fingerprint(jax.device_get(variables)) == fp  # numpy or jax leaves alike.
  changed = jax.tree_util.tree_map(lambda x: x, variables)
  kernel = changed["params"]["Dense_0"]["kernel"]
  changed["params"]["Dense_0"]["kernel"] = kernel.at[0, 0].add(1e-3)
  assert digit_features.fingerprint(changed) != fp


def test_cache_file_is_written_once(cache_dir):
  assert os.listdir(cache_dir) == [f"digit_features_v{digit_features.RECIPE_VERSION}.npz"]  # No temp files.


def _damage(good: str, path: str, damage: str) -> None:
  """Writes to `path` a damaged or mismatched copy of the valid cache file `good`."""
  with open(good, "rb") as f:
    content = f.read()
  if damage in ("truncated", "garbage", "empty"):
    content = {"truncated": content[:len(content) // 2], "garbage": b"not an npz file" * 100, "empty": b""}[damage]
    with open(path, "wb") as f:
      f.write(content)
    return
  with np.load(good) as npz:
    arrays = dict(npz)
  if damage == "other_data":
    arrays["data_hash"] = np.asarray("0" * 64)
  elif damage == "wrong_shape":
    arrays["variables/params/Dense_0/kernel"] = arrays["variables/params/Dense_0/kernel"][:, :5]
  elif damage == "missing_key":
    del arrays["test_accuracy"]
  elif damage == "nan":
    arrays["variables/params/Dense_1/bias"][0] = np.nan
  with open(path, "wb") as f:
    np.savez(f, **arrays)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "other_data", "wrong_shape", "missing_key",
                                    "nan"])
def test_damaged_cache_is_retrained(trained, cache_dir, tmp_path, monkeypatch, caplog, damage):
  path = digit_features.cache_path(str(tmp_path))
  _damage(digit_features.cache_path(cache_dir), path, damage)
  calls = []
  def fake_train(seed=0):  # The real training is deterministic (above): reuse its result.
    calls.append(seed)
    return trained
  monkeypatch.setattr(digit_features, "train", fake_train)
  with caplog.at_level(logging.WARNING):
    variables, accuracy = digit_features.load_or_train(str(tmp_path))
  assert calls == [0]
  assert f"Digit feature cache {path} is invalid" in caplog.text and "retraining" in caplog.text
  _assert_same_variables(variables, trained[0])
  assert accuracy == trained[1]
  _forbid_training(monkeypatch)  # The file was rewritten: the next call loads it.
  _assert_same_variables(digit_features.load_or_train(str(tmp_path))[0], trained[0])
  assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_unwritable_cache_dir_is_a_user_error_before_training(tmp_path, monkeypatch):
  _forbid_training(monkeypatch)
  blocker = tmp_path / "file"
  blocker.write_text("a regular file")
  cache_dir = str(blocker / "cache")
  with pytest.raises(UserError, match=f"directory '{cache_dir}' is not writable"):
    digit_features.load_or_train(cache_dir)
