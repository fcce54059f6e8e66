"""`imagenet_resized/64x64`: TFDS's box-resized ImageNet at 64×64×3 (Chrabaszcz et al. 2017), 1000 classes.

The dataset of the ImageNet 64×64 results of improved DDPM, ADM and classifier-free guidance. It is
read from the user's TFDS data dir and never downloaded: prepare it once with
`tfds build imagenet_resized/64x64 --data_dir=<dir> --file_format=array_record` (which needs the
downsampled-ImageNet archives; see the TFDS catalog). Splits: `train` (1,281,167) and `validation`
(50,000).

TFDS's labels follow the downsampled dataset's own class order (not imagenet2012's sorted WordNet
IDs); `imagenet_resized_classes.tsv` names each label in that order (the WordNet ID and torchvision's
English name of that ID).
"""

from __future__ import annotations

import importlib.resources

from diffusion_jax.data.spec import DatasetSpec

CAPTION_TEMPLATES = (
    "a photo of {article} {class_name}",
    "a blurry photo of {article} {class_name}",
    "a low resolution photo of {article} {class_name}",
    "{class_name}",
)

# Grid rows: classes that show guidance well (malamute is Figure 1 of Ho & Salimans 2022).
CANONICAL_CLASSES = ("malamute", "golden retriever", "Arctic fox", "giant panda", "macaw", "goldfish",
                     "volcano", "daisy")


def _read_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(WordNet IDs, names), one per label 0..999 of TFDS imagenet_resized."""
  text = importlib.resources.files("diffusion_jax.data").joinpath("imagenet_resized_classes.tsv").read_text()
  rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
  return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


WORDNET_IDS, CLASS_NAMES = _read_classes()


def _builder_cls():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder_cls("imagenet_resized")


SPEC = DatasetSpec(
    name="imagenet_resized/64x64",
    image_shape=(64, 64, 3),
    class_names=CLASS_NAMES,
    caption_templates=CAPTION_TEMPLATES,
    has_captions=False,
    builder_cls=_builder_cls,
    builder_config="64x64",
    rebuildable=False,
    random_flip=True,
    eval_split="validation",
    canonical_labels=tuple(CLASS_NAMES.index(name) for name in CANONICAL_CLASSES),
)
