import numpy as np

from diffusion_jax.config import get_default_config
from diffusion_jax.data import pipeline, registry
from diffusion_jax.data.builders import digits

SPEC = registry.get("digits")


def _source(data_dir, split):
  c = get_default_config()
  c.dataset.data_dir = data_dir
  return pipeline.data_source(c, split)


def test_counts_shapes_and_labels_match_sklearn(data_dir):
  train, test = _source(data_dir, "train"), _source(data_dir, "test")
  assert (len(train), len(test)) == (1500, 297)
  raw_images, raw_labels = digits.load_raw_digits()
  split = digits.split_indices()
  assert set(split["train"]).isdisjoint(split["test"])
  for ds, name in ((train, "train"), (test, "test")):
    labels = np.array([ds[i]["label"] for i in range(len(ds))])
    # TFDS may reorder examples; the multiset of labels must equal that of the split's indices.
    np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                  np.bincount(raw_labels[split[name]], minlength=10))
  ex = train[0]
  assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
  assert ex["image"].max() > 200  # 16 (the sklearn maximum) maps to 255.
  # The image is one of the raw sklearn images, rescaled 0..16 → 0..255.
  assert any(np.array_equal(ex["image"], raw_images[i]) for i in split["train"])


def test_captions_name_the_label_and_use_all_templates(data_dir):
  train = _source(data_dir, "train")
  seen_templates = set()
  for i in range(len(train)):
    ex = train[i]
    caption = ex["caption"].decode()
    label = int(ex["label"])
    matches = [t for t in range(SPEC.num_caption_templates) if SPEC.caption_for(label, t) == caption]
    assert matches, f"caption {caption!r} is not a template of label {label}"
    seen_templates.update(matches)
  assert seen_templates == set(range(SPEC.num_caption_templates))


def test_caption_examples():
  assert SPEC.caption_for(7, 0) == "a handwritten digit 7"
  assert SPEC.caption_for(7, 1) == "the number seven"
  assert SPEC.caption_for(7, 2) == "7"


def test_split_is_fixed():
  a, b = digits.split_indices(), digits.split_indices()
  np.testing.assert_array_equal(a["test"], b["test"])
  assert len(a["train"]) + len(a["test"]) == 1797
