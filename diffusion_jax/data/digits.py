"""The `digits` dataset: scikit-learn's 8×8 handwritten digits, built locally (`builders/digits.py`).

Grey-level 8×8×1 images of the digits 0..9; every example carries a caption drawn from
`CAPTION_TEMPLATES`. Images are never flipped: a mirrored digit is not a digit.
"""

from __future__ import annotations

from diffusion_jax.data.spec import DatasetSpec

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# `{label}` is the numeral, `{class_name}` the English word. The first template is the canonical prompt.
CAPTION_TEMPLATES = (
    "a handwritten digit {label}",
    "the number {class_name}",
    "{label}",
    "a drawing of the digit {class_name}",
    "handwritten {class_name}",
    "digit {label}",
)


def _builder_cls():
  from diffusion_jax.data.builders import digits  # pylint: disable=g-import-not-at-top  # Imports TFDS.
  return digits.Digits


def _reference_classifier():
  """An RBF-SVM trained on the real training digits, and its test accuracy (scores samples)."""
  from diffusion_jax.metrics import digit_classifier  # pylint: disable=g-import-not-at-top  # scikit-learn.
  return digit_classifier.train_on_real_digits()


SPEC = DatasetSpec(
    name="digits",
    image_shape=(8, 8, 1),
    class_names=DIGIT_WORDS,
    caption_templates=CAPTION_TEMPLATES,
    has_captions=True,
    builder_cls=_builder_cls,
    rebuildable=True,
    random_flip=False,
    feature_network="digits",  # Inception features mean little at 8×8: the project's own classifier's.
    reference_classifier=_reference_classifier,
)
