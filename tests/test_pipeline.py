import dataclasses

import pytest
import numpy as np

from diffusion_jax.data import pipeline, registry
from diffusion_jax.errors import UserError
from diffusion_jax.text.tokenizer import ByteTokenizer


def _take(it, n):
  return [next(it) for _ in range(n)]


def _train_iterator(config):
  return pipeline.create_train_iterator(config, tokenizer=ByteTokenizer(config.text.max_length))


def test_batches_are_deterministic_for_a_seed(config):
  a = _take(_train_iterator(config), 3)
  b = _take(_train_iterator(config), 3)
  for x, y in zip(a, b):
    for key in ("image", "tokens", "label"):
      np.testing.assert_array_equal(x[key], y[key])
  config.seed = 1
  c = _take(_train_iterator(config), 1)
  assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_batch_contents(config):
  batch = next(_train_iterator(config))
  assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.uint8
  assert batch["tokens"].shape == (16, 32) and batch["tokens"].dtype == np.int32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  tok, spec = ByteTokenizer(32), registry.get("digits")
  for tokens, label in zip(batch["tokens"], batch["label"]):
    assert tok.decode(tokens) in {spec.caption_for(int(label), t) for t in range(spec.num_caption_templates)}


def test_without_a_tokenizer_batches_have_no_tokens(config):
  batch = next(pipeline.create_train_iterator(config))
  assert set(batch) == {"image", "label"}
  np.testing.assert_array_equal(batch["image"], next(_train_iterator(config))["image"])


def test_iterator_state_restores_the_position(config):
  it = _train_iterator(config)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 2)
  fresh = _train_iterator(config)
  fresh.set_state(state)
  for x, y in zip(expected, _take(fresh, 2)):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_each_epoch_is_a_new_permutation_of_all_examples(config):
  config.batch_size = 100  # 1500 = 15 batches per epoch.
  ds = pipeline.make_dataset(config, "train", shuffle=True, repeat=True, process_index=0, process_count=1)
  it = iter(ds)
  epochs = [np.concatenate([next(it)["image"].reshape(100, -1) for _ in range(15)]) for _ in range(2)]
  # Same multiset of images in each epoch, in a different order.
  key = lambda e: sorted(map(bytes, e))
  assert key(epochs[0]) == key(epochs[1])
  assert not np.array_equal(epochs[0], epochs[1])


def test_processes_read_disjoint_slices_of_the_same_global_batches(config):
  """With P processes, concatenating the local batches gives exactly the 1-process global batch."""
  config.batch_size = 12
  tokenizer = ByteTokenizer(config.text.max_length)
  single = iter(pipeline.make_dataset(config, "train", tokenizer=tokenizer, shuffle=True, repeat=True,
                                      process_index=0, process_count=1))
  shards = [iter(pipeline.make_dataset(config, "train", tokenizer=tokenizer, shuffle=True, repeat=True,
                                       process_index=p, process_count=3)) for p in range(3)]
  for _ in range(3):
    global_batch = next(single)
    local = [next(it) for it in shards]
    assert all(b["image"].shape[0] == 4 for b in local)
    for key in ("image", "tokens", "label"):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), global_batch[key])


def test_one_pass_over_a_split_covers_it_once(config):
  config.batch_size = 100
  batches = list(pipeline.iterate_split(config, "test"))
  assert [len(b["label"]) for b in batches] == [100, 100, 97]
  rows = sorted(bytes(r) for b in batches for r in b["image"].reshape(len(b["image"]), -1))
  raw = pipeline.data_source(config, "test")
  assert rows == sorted(bytes(np.asarray(raw[i]["image"]).reshape(-1)) for i in range(len(raw)))


def test_cached_in_memory_the_stream_is_the_same_and_resumes_across_the_setting(config):
  """Decoding once into memory changes where the work is done, not the batches: the same images, tokens
  and labels over more than an epoch, with flips, and a state saved by one restores in the other."""
  config.batch_size = 256  # 1500 / 256: the seventh batch crosses into the second epoch.
  config.dataset.random_flip = True  # Exercises the flips' per-position random stream too.
  plain = _take(_train_iterator(config), 7)
  config.dataset.cache_in_memory = True
  cached_it = _train_iterator(config)
  cached = _take(cached_it, 7)
  for x, y in zip(plain, cached):
    for key in ("image", "tokens", "label"):
      np.testing.assert_array_equal(x[key], y[key])
  state, expected = cached_it.get_state(), _take(cached_it, 2)
  config.dataset.cache_in_memory = False
  resumed = _train_iterator(config)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 2)):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_cached_in_memory_bad_images_are_reported_at_start(config, monkeypatch):
  config.dataset.cache_in_memory = True
  other_shape = dataclasses.replace(registry.get("digits"), image_shape=(9, 9, 1))
  monkeypatch.setattr(pipeline.registry, "from_config", lambda config: other_shape)
  with pytest.raises(UserError, match=r"image of shape \(8, 8, 1\)"):
    pipeline.make_dataset(config, "train", shuffle=True, repeat=True, process_index=0, process_count=1)
