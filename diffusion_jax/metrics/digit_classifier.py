"""A digit classifier trained on the real digits (train split), used to score generated samples.

An RBF support-vector machine on the 64 pixel values: ≈99% accuracy on the held-out test split, so
the accuracy it reports on samples measures the sampler, not the classifier's mistakes.
"""

from __future__ import annotations

import numpy as np
from sklearn import svm

from diffusion_jax.data.builders import digits


def _features(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [N, 8, 8, 1] → float [N, 64] in [0, 1]."""
  images = np.asarray(images_uint8)
  return images.reshape(images.shape[0], -1).astype(np.float64) / 255.0


class DigitClassifier:
  """fit on real digits; predict labels 0..9 for uint8 images [N, 8, 8, 1]."""

  def __init__(self):
    self._svm = svm.SVC(C=10.0, gamma="scale")

  def fit(self, images_uint8: np.ndarray, labels: np.ndarray) -> "DigitClassifier":
    self._svm.fit(_features(images_uint8), np.asarray(labels))
    return self

  def predict(self, images_uint8: np.ndarray) -> np.ndarray:
    return self._svm.predict(_features(images_uint8)).astype(np.int64)

  def accuracy(self, images_uint8: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(self.predict(images_uint8) == np.asarray(labels)))


def train_on_real_digits() -> tuple[DigitClassifier, float]:
  """Fits on the dataset's train split; returns (classifier, accuracy on the test split).

  Reads the same raw data and split as the TFDS builder (`digits.split_indices`), so no prepared
  dataset is needed.
  """
  images, labels = digits.load_raw_digits()
  split = digits.split_indices()
  clf = DigitClassifier().fit(images[split["train"]], labels[split["train"]])
  return clf, clf.accuracy(images[split["test"]], labels[split["test"]])
