import numpy as np

from diffusion_jax.data import pipeline
from diffusion_jax.models.tokenizer import ByteTokenizer


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batches_are_deterministic_for_a_seed(config):
  a = _take(pipeline.create_train_iterator(config), 3)
  b = _take(pipeline.create_train_iterator(config), 3)
  for x, y in zip(a, b):
    for key in ("image", "tokens", "label"):
      np.testing.assert_array_equal(x[key], y[key])
  config.seed = 1
  c = _take(pipeline.create_train_iterator(config), 1)
  assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_batch_contents(config):
  batch = next(pipeline.create_train_iterator(config))
  assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.uint8
  assert batch["tokens"].shape == (16, 32) and batch["tokens"].dtype == np.int32
  tok = ByteTokenizer(32)
  for tokens, label in zip(batch["tokens"], batch["label"]):
    caption = tok.decode(tokens)
    assert str(label) in caption or caption.split()[-1] in (
        "zero one two three four five six seven eight nine".split()[label])


def test_iterator_state_restores_the_position(config):
  it = pipeline.create_train_iterator(config)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 2)
  fresh = pipeline.create_train_iterator(config)
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


def test_process_shards_are_disjoint_and_cover_the_split(config):
  config.batch_size = 10
  seen = []
  for index in range(2):
    ds = pipeline.make_dataset(config, "test", shuffle=False, repeat=False, process_index=index,
                               process_count=2)
    # Each process gets batch_size / process_count examples per batch.
    batches = list(ds)
    assert batches[0]["image"].shape[0] == 5
    seen.append(np.concatenate([b["image"].reshape(len(b["image"]), -1) for b in batches]))
  assert len(seen[0]) + len(seen[1]) == 297
  all_rows = [bytes(r) for r in np.concatenate(seen)]
  ref = [bytes(r) for b in pipeline.iterate_split(config, "test") for r in b["image"].reshape(len(b["image"]), -1)]
  assert sorted(all_rows) == sorted(ref)
