"""The `cifar10` dataset: TFDS's standard CIFAR-10 (32×32×3, 10 classes), read from the user's TFDS data dir.

The project never downloads it: prepare it once on a machine with internet access with
`tfds build cifar10 --data_dir=<dir> --file_format=array_record`. The examples have no captions;
text conditioning uses `CAPTION_TEMPLATES` on the class names.
"""

from __future__ import annotations

from diffusion_jax.data.spec import DatasetSpec

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The first template is the canonical prompt.
CAPTION_TEMPLATES = (
    "a photo of {article} {class_name}",
    "a blurry photo of {article} {class_name}",
    "a low resolution photo of {article} {class_name}",
    "a small photo of the {class_name}",
    "{class_name}",
)


def _builder_cls():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder_cls("cifar10")


SPEC = DatasetSpec(
    name="cifar10",
    image_shape=(32, 32, 3),
    class_names=CLASS_NAMES,
    caption_templates=CAPTION_TEMPLATES,
    has_captions=False,
    builder_cls=_builder_cls,
    rebuildable=False,
    random_flip=True,
)
