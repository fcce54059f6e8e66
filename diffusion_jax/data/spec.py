"""`DatasetSpec`: everything generic code may know about a dataset, in one frozen record.

A spec names the dataset's TFDS builder (imported lazily: the spec and the registry import without
TFDS, TensorFlow or grain), its image shape, its classes and the captions made from them, its splits
and its default augmentation. Each dataset module in `data/` defines one; `data/registry.py` lists them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset, as the pipeline, the conditioner, sampling and evaluation see it.

  Attributes:
    name: the registry name (`config.dataset.name`), also the TFDS name of its builder, with its
      config if it has one ("imagenet_resized/64x64").
    image_shape: (H, W, C) of the uint8 images.
    class_names: one name per label 0..num_classes-1 (used in captions and grid titles).
    caption_templates: `str.format` templates with the fields {label} (the integer), {class_name} and
      {article} ("a" or "an" before class_name); the first is the canonical caption of a label.
    has_captions: the examples carry a 'caption' text; otherwise captions come from the templates.
    builder_cls: a function that imports TFDS and returns the builder class.
    builder_config: the name of the builder's config ('' for builders without configs).
    rebuildable: the builder generates the data locally from what ships with the code, so a damaged
      copy may be set aside and rebuilt; any other dataset is the user's and is only read, never
      downloaded or touched.
    random_flip: whether training flips images horizontally at random by default
      (`config.dataset.random_flip` overrides it).
    train_split: the split training reads, and the real images that sample statistics (FID, …) are
      compared with, as papers report them (e.g. CIFAR-10's 50,000 training images).
    eval_split: the held-out split of the NLL bound and eval_loss.
    canonical_labels: the labels shown in sample grids; () means all of them, in order.
    feature_network: the network whose features sample quality is measured in ('inception' for natural
      images; see metrics/features.py).
    reference_classifier: None, or a function returning (a classifier trained on the real training
      images, with .predict(uint8 images [N, H, W, C]) → labels [N], its accuracy on the real test split):
      evaluation scores samples with it (is a sample of class c recognized as c?).
  """

  name: str
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  caption_templates: tuple[str, ...]
  has_captions: bool
  builder_cls: Callable[[], Any]
  rebuildable: bool
  random_flip: bool
  builder_config: str = ""
  train_split: str = "train"
  eval_split: str = "test"
  canonical_labels: tuple[int, ...] = ()
  feature_network: str = "inception"
  reference_classifier: Callable[[], tuple[Any, float]] | None = None

  def __post_init__(self):
    if len(self.image_shape) != 3:
      raise ValueError(f"{self.name}: image_shape={self.image_shape} must be (H, W, C)")
    if not self.caption_templates:
      raise ValueError(f"{self.name}: give at least one caption template")
    if not self.canonical_labels:
      object.__setattr__(self, "canonical_labels", tuple(range(self.num_classes)))
    if any(not 0 <= label < self.num_classes for label in self.canonical_labels):
      raise ValueError(f"{self.name}: canonical_labels={self.canonical_labels} must lie in "
                       f"[0, {self.num_classes})")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_caption_templates(self) -> int:
    return len(self.caption_templates)

  def caption_for(self, label: int, template: int = 0) -> str:
    """The caption of `label` in [0, num_classes) under template `template` (0 = canonical)."""
    class_name = self.class_names[label]
    article = "an" if class_name[:1].lower() in "aeiou" else "a"
    return self.caption_templates[template].format(label=label, class_name=class_name, article=article)

  def canonical_prompts(self) -> tuple[str, ...]:
    """The canonical caption of each canonical label: the prompts of sample grids."""
    return tuple(self.caption_for(label) for label in self.canonical_labels)

  def make_builder(self, data_dir: str):
    """The TFDS builder reading (or, if rebuildable, writing) ArrayRecord files under `data_dir`."""
    config = {"config": self.builder_config} if self.builder_config else {}
    return self.builder_cls()(data_dir=data_dir, file_format="array_record", **config)

  def dataset_dir(self, data_dir: str) -> str:
    """Where TFDS keeps the prepared dataset: <data_dir>/<name>[/<config>]/<version>.

    Computed from the builder class, without constructing a builder (which reads, and fails on, a
    damaged dataset_info.json there).
    """
    cls = self.builder_cls()
    return os.path.join(data_dir, cls.name, self.builder_config, str(cls.VERSION))

  @property
  def file_stem(self) -> str:
    """The name as a file-name part ('imagenet_resized/64x64' → 'imagenet_resized-64x64')."""
    return self.name.replace("/", "-")
