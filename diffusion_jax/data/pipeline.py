"""Input pipeline: TFDS ArrayRecord → `tfds.data_source` → grain → host-local numpy batches.

The global stream is one seeded shuffle of the split (a fresh permutation every epoch), cut into
global batches; process p of P reads only rows [p·b, (p+1)·b) of each global batch (b = B / P), so the
global batch is the same whatever the number of processes, and each process touches only its share.
Everything is a deterministic function of `config.seed`, and each process's iterator position can be
saved and restored (grain state).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data.builders import digits
from diffusion_jax.errors import UserError
from diffusion_jax.models.tokenizer import ByteTokenizer

BUILDERS = {"digits": digits.Digits}
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "diffusion_jax", "tensorflow_datasets")


def data_dir(config) -> str:
  """config.dataset.data_dir, else $DIFFUSION_JAX_DATA_DIR, else ~/.cache/diffusion_jax/…"""
  path = config.dataset.data_dir or os.environ.get("DIFFUSION_JAX_DATA_DIR", "") or DEFAULT_DATA_DIR
  return os.path.expanduser(path)


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The dataset's builder, prepared to ArrayRecord on first use (process 0 writes, others wait)."""
  name = config.dataset.name
  if name not in BUILDERS:
    raise UserError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")
  builder = BUILDERS[name](data_dir=data_dir(config), file_format="array_record")
  if jax.process_index() == 0:
    builder.download_and_prepare()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"prepare dataset {name}")
  return builder


def data_source(config, split: str) -> Any:
  """Random-access source of decoded examples {'image': uint8 [H, W, C], 'label', 'caption'}."""
  return get_builder(config).as_data_source(split=split)


class Tokenize(grain.transforms.Map):
  """{'image', 'label', 'caption'} → {'image' uint8 [H, W, C], 'tokens' int32 [L], 'label' int32}."""

  def __init__(self, tokenizer: ByteTokenizer, image_shape: tuple[int, int, int]):
    self._tokenizer = tokenizer
    self._image_shape = tuple(image_shape)

  def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(example["image"], np.uint8)
    if image.shape != self._image_shape:
      raise UserError(f"dataset image has shape {image.shape}; the config expects {self._image_shape} "
                      f"(dataset.image_size, dataset.channels)")
    return {"image": image, "tokens": self._tokenizer.encode(example["caption"]),
            "label": np.int32(example["label"])}


def local_batch_size(global_batch_size: int) -> int:
  count = jax.process_count()
  if global_batch_size % count:
    raise UserError(f"batch_size={global_batch_size} is not divisible by the {count} processes")
  return global_batch_size // count


def make_dataset(config, split: str, *, shuffle: bool, repeat: bool,
                 process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
  """The grain dataset of this process's host-local batches of batch_size / process_count examples."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  tokenizer = ByteTokenizer(config.text.max_length)
  image_shape = (config.dataset.image_size, config.dataset.image_size, config.dataset.channels)
  ds = grain.MapDataset.source(data_source(config, split)).seed(config.seed)
  if shuffle:
    ds = ds.shuffle()  # A new permutation each epoch (grain folds the epoch into the seed).
  if repeat:
    ds = ds.repeat(None)
  ds = ds.map(Tokenize(tokenizer, image_shape))
  # Local batch k·P + p is the p-th slice of global batch k. MapDataset is lazy: a process only
  # reads and decodes the examples of its own slices.
  ds = ds.batch(config.batch_size // process_count, drop_remainder=repeat)[process_index::process_count]
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.dataset.num_threads, prefetch_buffer_size=4))


def create_train_iterator(config) -> grain.DatasetIterator:
  """Infinite iterator of {'image': uint8 [b, H, W, C], 'tokens': int32 [b, L], 'label'} for this process,
  b = batch_size / process_count. Its `get_state()`/`set_state()` make it resumable."""
  local_batch_size(config.batch_size)
  return iter(make_dataset(config, "train", shuffle=True, repeat=True))


def iterate_split(config, split: str) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over `split` (all of it, on every process), in batches of config.batch_size."""
  return iter(make_dataset(config, split, shuffle=False, repeat=False, process_index=0, process_count=1))
