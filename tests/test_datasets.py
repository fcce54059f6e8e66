"""The dataset registry, a standard TFDS dataset (cifar10, mocked: nothing is downloaded) and random flips."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax.data import pipeline, registry
from diffusion_jax.errors import UserError
from diffusion_jax.text.tokenizer import ByteTokenizer
from tests.conftest import tiny_config


def _cifar10_config(data_dir: str, random_flip=None):
  c = tiny_config(data_dir)
  c.dataset.name = "cifar10"
  c.dataset.image_size = 32
  c.dataset.channels = 3
  c.dataset.random_flip = random_flip
  return c


@pytest.fixture
def mock_cifar10(monkeypatch):
  """cifar10 served by `tfds.testing.mock_data`: 64 random examples per split, the same in each.

  mock_data replaces `as_data_source` (it ignores data_dir); there are no files, so the pipeline's
  check of the prepared files on disk (`_prepare`) has nothing to check and is skipped.
  """
  monkeypatch.setattr(pipeline, "_prepare", lambda spec, root: None)
  with tfds.testing.mock_data(num_examples=64):
    yield


def _take(it, n):
  return [next(it) for _ in range(n)]


def _stream(config, random_flip, process_index=0, process_count=1):
  config.dataset.random_flip = random_flip
  return iter(pipeline.make_dataset(config, "train", shuffle=True, repeat=True, augment=True,
                                    process_index=process_index, process_count=process_count))


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_registry_lookup():
  assert registry.names() == ("cifar10", "digits", "imagenet_resized/64x64")
  digits, cifar10 = registry.get("digits"), registry.get("cifar10")
  assert (digits.image_shape, digits.num_classes, digits.has_captions) == ((8, 8, 1), 10, True)
  assert (cifar10.image_shape, cifar10.num_classes, cifar10.has_captions) == ((32, 32, 3), 10, False)
  assert (digits.random_flip, digits.rebuildable, cifar10.random_flip, cifar10.rebuildable) == (
      False, True, True, False)
  assert digits.eval_split == cifar10.eval_split == "test"
  assert digits.canonical_labels == cifar10.canonical_labels == tuple(range(10))


def test_unknown_dataset_lists_the_known_ones():
  with pytest.raises(UserError, match=r"unknown dataset.name='mnist'; choose one of cifar10, digits"):
    registry.get("mnist")


def test_captions_of_labels():
  digits, cifar10 = registry.get("digits"), registry.get("cifar10")
  assert [digits.caption_for(7, t) for t in range(3)] == ["a handwritten digit 7", "the number seven", "7"]
  assert cifar10.caption_for(0) == "a photo of an airplane" and cifar10.caption_for(2) == "a photo of a bird"
  assert cifar10.canonical_prompts()[9] == "a photo of a truck"
  assert all(cifar10.caption_for(label, t) for label in range(10) for t in range(cifar10.num_caption_templates))


def test_registry_imports_without_tfds_tensorflow_or_grain():
  code = ("import sys; import diffusion_jax.data.registry as r; r.get('cifar10').caption_for(3); "
          "print([m for m in ('tensorflow_datasets', 'tensorflow', 'grain') if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
  assert out.strip() == "[]"


def test_image_shape_of_the_config_must_match_the_dataset(tmp_path):
  config = _cifar10_config(str(tmp_path))
  config.dataset.image_size = 8
  with pytest.raises(UserError, match=r"dataset.image_size=8, dataset.channels=3 do not match dataset cifar10 "
                                      r"\(32×32×3 images\); set dataset.image_size=32 and dataset.channels=3"):
    pipeline.make_dataset(config, "train", shuffle=True, repeat=True)


def test_unprepared_cifar10_says_where_it_looked_and_how_to_prepare_it(tmp_path):
  (tmp_path / "cifar10" / "1.0.0").mkdir(parents=True)  # Another version is not this one.
  config = _cifar10_config(str(tmp_path))
  with pytest.raises(UserError) as exc:
    pipeline.create_train_iterator(config)
  message = str(exc.value)
  version_dir = registry.get("cifar10").dataset_dir(str(tmp_path))
  assert message.startswith(f"dataset cifar10 is not prepared in {tmp_path}: {version_dir} does not exist "
                            f"(it holds version 1.0.0)")
  assert f"`tfds build cifar10 --data_dir={tmp_path} --file_format=array_record`" in message
  assert "never downloads" in message and "\n" not in message
  assert sorted(os.listdir(tmp_path)) == ["cifar10"] and os.listdir(tmp_path / "cifar10") == ["1.0.0"]


def test_standard_datasets_are_read_from_the_tfds_data_dir(tmp_path, monkeypatch):
  monkeypatch.delenv("DIFFUSION_JAX_DATA_DIR", raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert pipeline.data_dir(_cifar10_config("")) == str(tmp_path)
  assert pipeline.data_dir(tiny_config("")) == os.path.expanduser(pipeline.PROJECT_DATA_DIR)
  with pytest.raises(UserError, match=f"dataset cifar10 is not prepared in {tmp_path}: "):
    pipeline.get_builder(_cifar10_config(""))


def test_cifar10_batches(mock_cifar10, tmp_path):
  config = _cifar10_config(str(tmp_path))
  batch = next(pipeline.create_train_iterator(config))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["label"].min() >= 0 and batch["label"].max() < 10


def test_cifar10_tokens_are_the_caption_of_the_label(mock_cifar10, tmp_path):
  config = _cifar10_config(str(tmp_path))
  tokenizer = ByteTokenizer(config.text.max_length)
  (batch,) = _take(pipeline.iterate_split(config, "test", tokenizer=tokenizer), 1)
  assert batch["tokens"].shape == (16, config.text.max_length) and batch["tokens"].dtype == np.int32
  spec = registry.get("cifar10")
  assert [tokenizer.decode(t) for t in batch["tokens"]] == [spec.caption_for(int(l)) for l in batch["label"]]


def test_random_flip_mirrors_about_half_of_the_examples(mock_cifar10, tmp_path):
  config = _cifar10_config(str(tmp_path))
  plain, flipped = _take(_stream(config, False), 4), _take(_stream(config, True), 4)
  num_flipped = 0
  for p, f in zip(plain, flipped):
    np.testing.assert_array_equal(p["label"], f["label"])
    for original, image in zip(p["image"], f["image"]):
      mirrored = np.array_equal(image, original[:, ::-1])
      assert mirrored or np.array_equal(image, original)
      num_flipped += mirrored
  assert 16 <= num_flipped <= 48, num_flipped  # Of 64: the binomial's 1/2 ± 4σ.


def test_random_flips_are_deterministic_and_independent_of_the_process_count(mock_cifar10, tmp_path):
  config = _cifar10_config(str(tmp_path))
  single = _take(_stream(config, True), 3)
  _assert_same_batches(single, _take(_stream(config, True), 3))
  halves = [_take(_stream(config, True, p, 2), 3) for p in range(2)]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)]
  _assert_same_batches(joined, single)


def test_random_flips_resume_from_the_iterator_state(mock_cifar10, tmp_path):
  config = _cifar10_config(str(tmp_path), random_flip=True)
  it = pipeline.create_train_iterator(config)
  _take(it, 5)  # Past the first epoch of 64 examples.
  state = it.get_state()
  expected = _take(it, 3)
  fresh = pipeline.create_train_iterator(config)
  fresh.set_state(state)
  _assert_same_batches(_take(fresh, 3), expected)


def test_random_flip_setting_overrides_the_dataset_default(tmp_path):
  assert pipeline.random_flip(_cifar10_config(str(tmp_path)))
  assert not pipeline.random_flip(_cifar10_config(str(tmp_path), random_flip=False))
  config = tiny_config(str(tmp_path))
  config.dataset.random_flip = None
  assert not pipeline.random_flip(config)
  config.dataset.random_flip = True
  assert pipeline.random_flip(config)


def test_digits_are_not_flipped_by_default(config):
  config.dataset.random_flip = None
  training = _take(pipeline.create_train_iterator(config), 2)
  unaugmented = _take(iter(pipeline.make_dataset(config, "train", shuffle=True, repeat=True, augment=False)), 2)
  _assert_same_batches(training, unaugmented)
