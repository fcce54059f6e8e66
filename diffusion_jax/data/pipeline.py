"""Input pipeline: TFDS ArrayRecord → `tfds.data_source` → grain → host-local numpy batches.

Any dataset of the registry (`data/registry.py`); nothing here names one. The global stream is one
seeded shuffle of the split (a fresh permutation every epoch), cut into global batches; process p of P
reads only rows [p·b, (p+1)·b) of each global batch (b = B / P), so the global batch is the same whatever
the number of processes, and each process touches only its share. Everything, the random flips
included, is a deterministic function of `config.seed` and the position in the global stream, and
each process's iterator position can be saved and restored (grain state).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Iterator, Protocol, Sequence

from absl import logging
from array_record.python import array_record_module
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data import registry
from diffusion_jax.data.spec import DatasetSpec
from diffusion_jax.errors import UserError

# Project datasets (rebuildable: generated from data that ships with the code) are prepared here;
# standard TFDS datasets are read from the user's TFDS data dir, where `tfds build` puts them.
PROJECT_DATA_DIR = os.path.join("~", ".cache", "diffusion_jax", "tensorflow_datasets")
TFDS_DATA_DIR = os.path.join("~", "tensorflow_datasets")
_FLIP_STREAM = 1  # Seeds the flips from [config.seed, _FLIP_STREAM], apart from grain's shuffle seed.


class Tokenizer(Protocol):
  """What the pipeline needs of a tokenizer (e.g. text.tokenizer.ByteTokenizer)."""

  def encode(self, text: str) -> np.ndarray:
    """Returns int32 [L], the same L for every text."""


def data_dir(config) -> str:
  """config.dataset.data_dir, else $DIFFUSION_JAX_DATA_DIR, else the dataset's default: PROJECT_DATA_DIR
  for a project dataset, $TFDS_DATA_DIR or ~/tensorflow_datasets (TFDS's own default) for a standard one."""
  if registry.get(config.dataset.name).rebuildable:
    default = PROJECT_DATA_DIR
  else:
    default = os.environ.get("TFDS_DATA_DIR", "") or TFDS_DATA_DIR
  path = config.dataset.data_dir or os.environ.get("DIFFUSION_JAX_DATA_DIR", "") or default
  return os.path.expanduser(path)


def random_flip(config) -> bool:
  """Whether training flips images: config.dataset.random_flip, or the dataset's default if None."""
  flip = config.dataset.get("random_flip", None)
  return registry.get(config.dataset.name).random_flip if flip is None else bool(flip)


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The dataset's builder, checked on every use: a project dataset is prepared (to ArrayRecord) on first
  use; a standard one must already be prepared in data_dir(config), and is never downloaded.

  Process 0 checks, (re)builds and writes; the others wait at the sync point and only then read
  dataset_info.json, so they see what process 0 left there.
  """
  spec = registry.get(config.dataset.name)
  root = data_dir(config)
  if jax.process_index() == 0:
    _prepare(spec, root)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"prepare dataset {spec.name}")
  return spec.make_builder(root)


def data_source(config, split: str) -> CheckedSource:
  """Random-access source of decoded examples {'image': uint8 [H, W, C], 'label', 'caption' (if any)…}."""
  builder = get_builder(config)
  spec = registry.get(config.dataset.name)
  return CheckedSource(builder.as_data_source(split=split), f"{spec.name}/{split}", str(builder.data_dir),
                       _how_to_rebuild(spec, data_dir(config), str(builder.data_dir)))


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
      raise self._damaged(f"record {index}", exc) from exc

  def __getitems__(self, indices: Sequence[int]) -> list[Any]:
    """The records at `indices`, read in one call. Reading them one by one while another thread traces
    or compiles costs a GIL hand-over per record: the 1,500 digits took 8.5 s that way at start-up, one
    call takes ~0.1 s."""
    bad = [i for i in indices if not 0 <= i < len(self._source)]
    if bad:
      raise IndexError(f"record {bad[0]} of {self._what} is out of range [0, {len(self._source)})")
    try:
      return list(self._source.__getitems__(list(indices)))
    except UserError:
      raise
    except Exception as exc:  # pylint: disable=broad-except  # Any other failure is a damaged file.
      raise self._damaged(f"records {indices[0]}…{indices[-1]}", exc) from exc

  def _damaged(self, which: str, exc: Exception) -> UserError:
    return UserError(f"cannot read {which} of {self._what} in {self._path} ({_first_line(exc)}): "
                     f"the TFDS cache is damaged; {self._fix}")

  def __repr__(self) -> str:
    return f"CheckedSource({self._what} in {self._path})"


def _prepare(spec: DatasetSpec, root: str) -> None:
  """Process 0: prepares a project dataset, or makes sure the copy already there is usable.

  TFDS reuses any directory it finds at <root>/<name>/<version>; one that a killed run, a full disk
  or a bad sector damaged then fails much later, as `KeyError: splits is empty` or "Corrupted
  Riegeli/records file". A damaged project dataset is set aside and rebuilt (once); for a standard
  one, missing or damaged, the error says where it looked and how to prepare it.
  """
  path = spec.dataset_dir(root)
  rebuilt = False
  while True:
    if not tfds.core.Path(path).exists():
      if not spec.rebuildable:
        raise UserError(_not_prepared(spec, root, path))
      spec.make_builder(root).download_and_prepare()
    problem = _damage(path, read_records=spec.rebuildable)
    if problem is None:
      return
    if not spec.rebuildable:
      raise UserError(f"the prepared dataset {spec.name} in {path} is damaged: {problem}; "
                      f"{_how_to_rebuild(spec, root, path)}")
    if rebuilt:
      raise UserError(f"dataset {spec.name} was rebuilt in {path} and is still unreadable: {problem}; "
                      f"check the disk, or set dataset.data_dir to another directory")
    _set_aside(path, problem)
    rebuilt = True


def _tfds_build(spec: DatasetSpec, root: str, *flags: str) -> str:
  """The command that prepares a standard dataset where the pipeline reads it."""
  return " ".join((f"`tfds build {spec.name} --data_dir={root} --file_format=array_record",) + flags) + "`"


def _not_prepared(spec: DatasetSpec, root: str, path: str) -> str:
  """The error for a standard dataset that is not in `path`, naming any other versions found beside it."""
  versions = tfds.core.Path(root) / spec.name
  found = []
  if versions.is_dir():
    found = sorted(p.name for p in versions.iterdir() if re.fullmatch(r"\d+\.\d+\.\d+", p.name))
  found_text = f" (it holds version {', '.join(found)})" if found else ""
  return (f"dataset {spec.name} is not prepared in {root}: {path} does not exist{found_text}; this project "
          f"never downloads it: prepare it on a machine with internet access with {_tfds_build(spec, root)} "
          f"and copy the directory {versions} to this machine, or set dataset.data_dir to the TFDS data dir "
          f"that holds it")


def _how_to_rebuild(spec: DatasetSpec, root: str, path: str) -> str:
  if spec.rebuildable:
    return f"delete {path} and rerun to rebuild it"
  return f"rebuild it on a machine with internet access with {_tfds_build(spec, root, '--overwrite')}"


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


class ExampleFields(grain.transforms.Map):
  """A decoded example → {'image': uint8 [H, W, C], 'label': int32, 'tokens': int32 [L] (with a tokenizer)}.

  The tokens encode the example's caption, or for a dataset without captions the canonical caption
  of its label.
  """

  def __init__(self, spec: DatasetSpec, tokenizer: Tokenizer | None):
    self._spec = spec
    self._tokenizer = tokenizer

  def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(example["image"], np.uint8)
    if image.shape != self._spec.image_shape:
      raise UserError(f"dataset {self._spec.name} has an image of shape {image.shape}; its spec and the "
                      f"config (dataset.image_size, dataset.channels) say {self._spec.image_shape}")
    label = np.int32(example["label"])
    fields = {"image": image, "label": label}
    if self._tokenizer is not None:
      if self._spec.has_captions:
        caption = example["caption"]
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
      else:
        caption = self._spec.caption_for(int(label))
      fields["tokens"] = self._tokenizer.encode(caption)
    return fields


class RandomFlip(grain.transforms.RandomMap):
  """Mirrors the image left-right with probability 1/2: 'image' uint8 [H, W, C] → [H, W, C]."""

  def random_map(self, example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if rng.random() < 0.5:
      example = dict(example, image=np.ascontiguousarray(example["image"][:, ::-1]))
    return example


def decode_in_memory(source: CheckedSource, fields: ExampleFields) -> list[dict[str, np.ndarray]]:
  """Every record of `source` read and mapped by `fields`, in record order: a source for grain that
  yields what `MapDataset.source(source).map(fields)` does (the shuffle depends only on the length)."""
  start = time.perf_counter()
  examples = [fields.map(example) for example in source.__getitems__(range(len(source)))]
  size = sum(v.nbytes for v in examples[0].values()) * len(examples) if examples else 0
  logging.info("Decoded %d examples of %r into memory (%.1f MiB) in %.1f s.", len(examples), source,
               size / 2**20, time.perf_counter() - start)
  return examples


def flip_seed(seed: int) -> int:
  """The seed of the flips, derived from config.seed (a stream of its own, apart from the shuffle's)."""
  return int(np.random.SeedSequence([seed, _FLIP_STREAM]).generate_state(1)[0])


def local_batch_size(global_batch_size: int) -> int:
  count = jax.process_count()
  if global_batch_size % count:
    raise UserError(f"batch_size={global_batch_size} is not divisible by the {count} processes")
  return global_batch_size // count


def make_dataset(config, split: str, *, tokenizer: Tokenizer | None = None, shuffle: bool, repeat: bool,
                 augment: bool = False, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """The grain dataset of this process's host-local batches of batch_size / process_count examples.

  Batches are {'image': uint8 [b, H, W, C], 'label': int32 [b]} plus 'tokens': int32 [b, L] when a
  tokenizer is given. With `augment` (training), images are flipped at random if random_flip(config):
  each flip is drawn from flip_seed(config.seed) and the example's position in the global stream (epoch
  · N + i), so it does not depend on the process count and an iterator restored from its state draws
  the same flips.
  """
  spec = registry.from_config(config)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  fields = ExampleFields(spec, tokenizer)
  source = data_source(config, split)
  if config.dataset.cache_in_memory:
    source = decode_in_memory(source, fields)
  ds = grain.MapDataset.source(source).seed(config.seed)
  if shuffle:
    ds = ds.shuffle()  # A new permutation each epoch (grain folds the epoch into the seed).
  if repeat:
    ds = ds.repeat(None)
  if not config.dataset.cache_in_memory:
    ds = ds.map(fields)
  if augment and random_flip(config):
    # Before batching: the RNG of element i is Philox(flip_seed) at counter i, i the global position.
    ds = ds.random_map(RandomFlip(), seed=flip_seed(config.seed))
  # Local batch k·P + p is the p-th slice of global batch k. MapDataset is lazy: a process only
  # reads and decodes the examples of its own slices.
  ds = ds.batch(config.batch_size // process_count, drop_remainder=repeat)[process_index::process_count]
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.dataset.num_threads, prefetch_buffer_size=4))


def create_train_iterator(config, tokenizer: Tokenizer | None = None) -> grain.DatasetIterator:
  """Infinite, shuffled and augmented iterator over the dataset's train split for this process:
  {'image': uint8 [b, H, W, C], 'label': int32 [b]} (+ 'tokens': int32 [b, L] with a tokenizer),
  b = batch_size / process_count. Its `get_state()`/`set_state()` make it resumable."""
  local_batch_size(config.batch_size)
  spec = registry.from_config(config)
  return iter(make_dataset(config, spec.train_split, tokenizer=tokenizer, shuffle=True, repeat=True,
                           augment=True))


def iterate_split(config, split: str, tokenizer: Tokenizer | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over `split` (all of it, on every process, never flipped), in batches of
  config.batch_size."""
  return iter(make_dataset(config, split, tokenizer=tokenizer, shuffle=False, repeat=False, process_index=0,
                           process_count=1))
