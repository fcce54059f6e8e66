"""The datasets this project knows, by name: `get(config.dataset.name)` → its `DatasetSpec`.

Adding a dataset = a module in `data/` that defines `SPEC` + a line below + a config. Importing the
registry imports neither TFDS, TensorFlow nor grain (the model and the train step depend on it).
"""

from __future__ import annotations

from diffusion_jax.data import cifar10, digits, imagenet64
from diffusion_jax.data.spec import DatasetSpec
from diffusion_jax.errors import UserError

__all__ = ["DatasetSpec", "from_config", "get", "names"]

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (digits.SPEC, cifar10.SPEC, imagenet64.SPEC)}


def names() -> tuple[str, ...]:
  """The registered dataset names, sorted (the allowed values of `dataset.name`)."""
  return tuple(sorted(DATASETS))


def get(name: str) -> DatasetSpec:
  """The spec of dataset `name`; a UserError naming the known datasets for any other name."""
  if name not in DATASETS:
    raise UserError(f"unknown dataset.name={name!r}; choose one of {', '.join(names())}")
  return DATASETS[name]


def from_config(config) -> DatasetSpec:
  """The spec of `config.dataset.name`, checked against `config.dataset.image_size` and `.channels`."""
  spec = get(config.dataset.name)
  height, width, channels = spec.image_shape
  size = config.dataset.image_size
  if (size, size, config.dataset.channels) != (height, width, channels):
    raise UserError(f"dataset.image_size={size}, dataset.channels={config.dataset.channels} do not match "
                    f"dataset {spec.name} ({height}×{width}×{channels} images); "
                    f"set dataset.image_size={height} and dataset.channels={channels}")
  return spec
