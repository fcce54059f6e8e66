"""TFDS builder for the handwritten digits that ship inside scikit-learn.

The 1,797 8×8 grey-level images of `sklearn.datasets.load_digits` (UCI "Optical
Recognition of Handwritten Digits", pixel values 0..16) become a text-to-image
dataset: each example has the image (uint8, rescaled 0..16 → 0..255), its label
and one caption drawn from the caption templates of its spec (`data/digits.py`).
Nothing is downloaded: the raw data is read from the installed scikit-learn package.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data.digits import SPEC  # The image shape and the captions (TFDS-free).

NUM_TEST_EXAMPLES = 297  # 1,797 = 1,500 train + 297 test.
SPLIT_SEED = 0
CAPTION_SEED = 1
_SKLEARN_MAX_VALUE = 16


def load_raw_digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [1797, 8, 8, 1] in 0..255, labels int64 [1797])."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  raw = datasets.load_digits()
  images = np.round(raw.images * (255.0 / _SKLEARN_MAX_VALUE)).astype(np.uint8)
  return images[..., None], raw.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
  """The fixed train/test partition of the 1,797 examples (seeded permutation)."""
  n = 1797
  order = np.random.default_rng(SPLIT_SEED).permutation(n)
  return {"test": np.sort(order[:NUM_TEST_EXAMPLES]), "train": np.sort(order[NUM_TEST_EXAMPLES:])}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8×8 handwritten digits with templated captions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=SPEC.image_shape),
            "label": tfds.features.ClassLabel(num_classes=SPEC.num_classes),
            "caption": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships with scikit-learn.
    return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

  def _generate_examples(self, indices: np.ndarray):
    images, labels = load_raw_digits()
    for i in indices:
      rng = np.random.default_rng([CAPTION_SEED, int(i)])
      template = int(rng.integers(SPEC.num_caption_templates))
      label = int(labels[i])
      yield int(i), {"image": images[i], "label": label, "caption": SPEC.caption_for(label, template)}
