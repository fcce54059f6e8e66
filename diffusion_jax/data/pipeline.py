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

from absl import logging
from array_record.python import array_record_module
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data.builders import digits
from diffusion_jax.errors import UserError
from diffusion_jax.models.tokenizer import ByteTokenizer

BUILDERS = {"digits": digits.Digits}
# Project builders, generated from data that ships with the code (scikit-learn): a damaged prepared
# copy is set aside and rebuilt. Any other dataset (a user's TFDS download) is reported, never touched.
REBUILDABLE = {"digits"}
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "diffusion_jax", "tensorflow_datasets")


def data_dir(config) -> str:
  """config.dataset.data_dir, else $DIFFUSION_JAX_DATA_DIR, else ~/.cache/diffusion_jax/…"""
  path = config.dataset.data_dir or os.environ.get("DIFFUSION_JAX_DATA_DIR", "") or DEFAULT_DATA_DIR
  return os.path.expanduser(path)


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The dataset's builder, prepared to ArrayRecord on first use and checked on every use.

  Process 0 checks, (re)builds and writes; the others wait at the sync point and only then read
  dataset_info.json, so they see what process 0 left there.
  """
  name = config.dataset.name
  if name not in BUILDERS:
    raise UserError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")
  root = data_dir(config)
  if jax.process_index() == 0:
    _prepare(name, root)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"prepare dataset {name}")
  return BUILDERS[name](data_dir=root, file_format="array_record")


def data_source(config, split: str) -> CheckedSource:
  """Random-access source of decoded examples {'image': uint8 [H, W, C], 'label', 'caption'}."""
  builder = get_builder(config)
  name = config.dataset.name
  return CheckedSource(builder.as_data_source(split=split), f"{name}/{split}", str(builder.data_dir),
                       _how_to_rebuild(name, data_dir(config), str(builder.data_dir)))


class CheckedSource:
  """A data source whose read errors become a UserError naming the cache directory and its fix.

  Damage can surface at any record in any epoch (a disk error after startup, or a standard dataset,
  which get_builder checks only down to each shard's record count), inside grain's reader threads;
  without this the user sees a bare "Corrupted Riegeli/records file" traceback.
  """

  def __init__(self, source, what: str, path: str, fix: str):
    self._source, self._what, self._path, self._fix = source, what, path, fix

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    if not 0 <= index < len(self._source):  # The caller's mistake, not damage; ends old-style iteration.
      raise IndexError(f"record {index} of {self._what} is out of range [0, {len(self._source)})")
    try:
      return self._source[index]
    except UserError:
      raise
    except Exception as exc:  # pylint: disable=broad-except  # Any other failure is a damaged file.
      raise UserError(f"cannot read record {index} of {self._what} in {self._path} ({_first_line(exc)}): "
                      f"the TFDS cache is damaged; {self._fix}") from exc

  def __repr__(self) -> str:
    return f"CheckedSource({self._what} in {self._path})"


def _prepare(name: str, root: str) -> None:
  """Process 0: prepares the dataset, or makes sure the copy already there is usable.

  TFDS reuses any directory it finds at <root>/<name>/<version>; one that a killed run, a full disk
  or a bad sector damaged then fails much later, as `KeyError: splits is empty` or "Corrupted
  Riegeli/records file". A damaged project dataset is set aside and rebuilt (once); for any other,
  the error says where it is and how to rebuild it.
  """
  path = _dataset_dir(name, root)
  rebuildable, rebuilt = name in REBUILDABLE, False
  while True:
    if not tfds.core.Path(path).exists():
      BUILDERS[name](data_dir=root, file_format="array_record").download_and_prepare()
    problem = _damage(path, read_records=rebuildable)
    if problem is None:
      return
    if not rebuildable:
      raise UserError(f"the prepared dataset {name} in {path} is damaged: {problem}; "
                      f"{_how_to_rebuild(name, root, path)}")
    if rebuilt:
      raise UserError(f"dataset {name} was rebuilt in {path} and is still unreadable: {problem}; "
                      f"check the disk, or set dataset.data_dir to another directory")
    _set_aside(path, problem)
    rebuilt = True


def _dataset_dir(name: str, root: str) -> str:
  """Where TFDS keeps the prepared dataset: <root>/<name>/<version> (BUILDERS have no configs)."""
  cls = BUILDERS[name]
  return os.path.join(root, cls.name, str(cls.VERSION))


def _how_to_rebuild(name: str, root: str, path: str) -> str:
  if name in REBUILDABLE:
    return f"delete {path} and rerun to rebuild it"
  return (f"delete {path} and rerun to prepare it again, or rebuild it with "
          f"`tfds build {name} --data_dir={root} --file_format=array_record --overwrite`")


def _damage(path: str, read_records: bool) -> str | None:
  """What makes the prepared dataset in `path` unusable, or None if it looks whole.

  Always cheap: reads dataset_info.json and each shard's footer (its record count). With
  `read_records` (the project's small datasets) it also reads every record's bytes, which checks
  each chunk's hash and so finds damage anywhere in a shard: ~7 ms for the 1,797 records of digits
  (decoding them all through the data source would take ~0.2 s).
  """
  info_path = tfds.core.Path(path) / "dataset_info.json"  # epath: data_dir may be gs://….
  if not info_path.exists():
    return "dataset_info.json is missing"
  try:
    info = tfds.core.dataset_info.read_from_json(info_path)
  except Exception as exc:  # pylint: disable=broad-except  # OSError, UnicodeError, json_format.ParseError…
    return f"dataset_info.json cannot be read ({_first_line(exc)})"
  if not info.splits:
    return "dataset_info.json lists no splits"
  if info.file_format != "array_record":
    return f"it is stored as {info.file_format or 'tfrecord'}; random access needs array_record"
  template = tfds.core.ShardedFileTemplate(data_dir=tfds.core.Path(path), dataset_name=info.name,
                                           filetype_suffix=info.file_format)
  for split_proto in info.splits:
    split = tfds.core.SplitInfo.from_proto(split_proto, filename_template=template)
    for shard, expected in zip(split.filepaths, split.shard_lengths):
      if not shard.exists():
        return f"shard {shard.name} of split {split.name} is missing"
      try:
        reader = array_record_module.ArrayRecordReader(os.fspath(shard))
        count = reader.num_records()
        if read_records:
          reader.read_all()
        reader.close()
      except Exception as exc:  # pylint: disable=broad-except  # RuntimeError from riegeli, OSError.
        return f"shard {shard.name} cannot be read ({_first_line(exc)})"
      if count != expected:
        return f"shard {shard.name} holds {count} records; dataset_info.json says {expected}"
  return None


def _set_aside(path: str, problem: str) -> None:
  """Renames a damaged dataset to <path>.damaged (replacing an older one) before it is rebuilt.

  A rename, not a delete: it is atomic (no half-deleted directory if the run dies here), and the
  damaged files stay there to inspect; keeping only the latest copy bounds the disk they use.
  """
  aside = tfds.core.Path(path + ".damaged")
  logging.warning("The prepared dataset in %s is damaged (%s): moving it to %s and rebuilding it.",
                  path, problem, aside)
  if aside.exists():
    aside.rmtree()
  tfds.core.Path(path).rename(aside)


def _first_line(exc: Exception) -> str:
  lines = str(exc).strip().splitlines()
  return lines[0] if lines else type(exc).__name__


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
