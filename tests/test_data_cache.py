"""A damaged TFDS cache: project datasets are rebuilt, others are reported with their directory and fix."""

import dataclasses
import glob
import logging
import os
import shutil

import numpy as np
import pytest

from diffusion_jax.data import pipeline, registry
from diffusion_jax.errors import UserError
from tests.conftest import tiny_config


@pytest.fixture
def config(data_dir, tmp_path):
  """A tiny config on a fresh copy of the session's prepared digits (copying beats preparing)."""
  shutil.copytree(os.path.join(data_dir, "digits"), tmp_path / "digits")
  return tiny_config(str(tmp_path))


def _dataset_dir(config) -> str:
  return os.path.join(pipeline.data_dir(config), "digits", "1.0.0")


def _records(config, split):
  source = pipeline.data_source(config, split)
  return [source[i] for i in range(len(source))]


def _assert_same_records(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    assert (x["label"], x["caption"]) == (y["label"], y["caption"])


def _as_standard_dataset(monkeypatch) -> None:
  """Registers digits as a standard (not rebuildable) dataset, as a user's TFDS download would be."""
  spec = dataclasses.replace(registry.get("digits"), rebuildable=False)
  monkeypatch.setitem(registry.DATASETS, "digits", spec)


def _corrupt_train_shard(config) -> None:
  """Overwrites bytes in the middle of the train shard: a chunk's hash no longer matches."""
  (shard,) = glob.glob(os.path.join(_dataset_dir(config), "digits-train.array_record-*"))
  with open(shard, "r+b") as f:
    f.seek(os.path.getsize(shard) // 2)
    f.write(b"\xff" * 64)


def test_missing_dataset_info_is_rebuilt(config, data_dir, caplog):
  clean = {split: _records(tiny_config(data_dir), split) for split in ("train", "test")}
  os.remove(os.path.join(_dataset_dir(config), "dataset_info.json"))
  with caplog.at_level(logging.WARNING):
    pipeline.get_builder(config)
  assert f"{_dataset_dir(config)} is damaged (dataset_info.json is missing)" in caplog.text
  assert os.path.isdir(_dataset_dir(config) + ".damaged")
  for split in ("train", "test"):
    _assert_same_records(_records(config, split), clean[split])


def test_corrupt_shard_is_rebuilt(config, data_dir, caplog):
  _corrupt_train_shard(config)
  with caplog.at_level(logging.WARNING):
    pipeline.get_builder(config)
  assert "Corrupted Riegeli/records file" in caplog.text and "rebuilding it" in caplog.text
  _assert_same_records(_records(config, "train"), _records(tiny_config(data_dir), "train"))


def test_clean_dataset_is_reused(config, caplog):
  with caplog.at_level(logging.WARNING):
    pipeline.get_builder(config)
  assert "damaged" not in caplog.text
  assert not os.path.exists(_dataset_dir(config) + ".damaged")


def test_damaged_standard_dataset_names_its_directory_and_the_fix(config, monkeypatch):
  _as_standard_dataset(monkeypatch)
  os.remove(os.path.join(_dataset_dir(config), "dataset_info.json"))
  with pytest.raises(UserError, match="dataset_info.json is missing") as exc:
    pipeline.get_builder(config)
  message = str(exc.value)
  assert f"in {_dataset_dir(config)} is damaged" in message
  assert f"tfds build digits --data_dir={pipeline.data_dir(config)}" in message and "\n" not in message
  assert not os.path.exists(_dataset_dir(config) + ".damaged")  # A user's dataset is left alone.


@pytest.mark.parametrize("rebuildable, fix", [(True, "and rerun to rebuild it"), (False, "tfds build digits")])
def test_corrupt_record_at_read_time_is_a_user_error(config, monkeypatch, rebuildable, fix):
  """Damage after get_builder's check (as in a later epoch) surfaces as a UserError where grain reads."""
  if not rebuildable:
    _as_standard_dataset(monkeypatch)
  it = pipeline.create_train_iterator(config)  # Checks the dataset; reads nothing yet.
  _corrupt_train_shard(config)
  with pytest.raises(UserError) as exc:
    for _ in range(100):  # 16 per batch from 2 reader threads: all 1,500 examples of the first epoch.
      next(it)
  message = str(exc.value)
  assert message.startswith("cannot read record ") and "of digits/train in " + _dataset_dir(config) in message
  assert "Corrupted Riegeli/records file" in message and fix in message and "\n" not in message


def test_checked_source_passes_index_errors_through(config):
  source = pipeline.data_source(config, "test")
  with pytest.raises(IndexError):
    source[len(source)]
  with pytest.raises(IndexError):
    source.__getitems__([0, len(source)])


def test_checked_source_reads_a_batch_as_record_by_record(config):
  """One batched read (decode_in_memory's) returns what reading the records one by one does."""
  source = pipeline.data_source(config, "test")
  _assert_same_records(source.__getitems__(range(len(source))), _records(config, "test"))


def test_corrupt_record_in_a_batched_read_is_a_user_error(config):
  """Damage found by the in-memory decode's batched read is the same one-line error naming the fix."""
  source = pipeline.data_source(config, "train")  # Checks the dataset; reads nothing yet.
  _corrupt_train_shard(config)
  with pytest.raises(UserError) as exc:
    source.__getitems__(range(len(source)))
  message = str(exc.value)
  assert message.startswith("cannot read records 0…1499 of digits/train in " + _dataset_dir(config))
  assert "Corrupted Riegeli/records file" in message and "rerun to rebuild it" in message and "\n" not in message
