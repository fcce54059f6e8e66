"""Feature networks by name: the space in which evaluation compares samples with real images.

- `inception`: the FID Inception network (TTUR's 2015-12-05 graph, as pytorch-fid runs it): 2048-d pool
  features and 1008 logits. Its Fréchet distance is what papers call FID. Weights come from a local file
  (`--inception_weights`); nothing is downloaded.
- `digits`: the project's own small classifier of the 8×8 digits (Inception features mean little at 8×8),
  trained once, deterministically, and cached; 10 logits.

Each network is a pure function of uint8 images, so evaluation jits it together with the sampler and
runs it sharded like the samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax import paths
from diffusion_jax.errors import UserError

NETWORKS = ("inception", "digits")
# Where trained feature networks and reference statistics of real data are kept (the user's cache).
cache_dir = paths.cache_dir


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  """A feature network with its weights.

  Attributes:
    name: one of NETWORKS.
    dim: D, the feature dimension.
    num_logits: C, the number of classes of its logits (Inception Score, accuracy).
    apply: jittable fn(variables, images uint8 [N, H, W, C]) → (features float32 [N, D], logits [N, C]).
    variables: the weights `apply` takes.
    fingerprint: a short hash of the weights; reference statistics are cached under it.
    fd_name: what the Fréchet distance in these features is called in metrics ('fid' for Inception).
  """

  name: str
  dim: int
  num_logits: int
  apply: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
  variables: Any
  fingerprint: str
  fd_name: str


def _inception(weights: str) -> FeatureNetwork:
  from diffusion_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  if not weights:
    raise UserError(f"the 'inception' feature network needs its weights: pass --inception_weights=PATH "
                    f"(config.eval.inception_weights). {inception.WEIGHTS_HELP}")
  variables = inception.load_variables(weights)
  module = inception.FIDInceptionV3()

  def apply(variables, images):
    images = images.astype(jnp.float32)
    if images.shape[-1] == 1:  # Grey images: the network reads RGB.
      images = jnp.repeat(images, 3, axis=-1)
    out = module.apply(variables, images)
    return out["pool"], out["logits"]

  return FeatureNetwork("inception", inception.NUM_FEATURES, inception.NUM_LOGITS, apply, variables,
                        fingerprint(variables), "fid")


def _digits(cache: str) -> FeatureNetwork:
  from diffusion_jax.metrics import digit_features  # pylint: disable=g-import-not-at-top
  variables, _ = digit_features.load_or_train(cache)
  return FeatureNetwork("digits", digit_features.FEATURE_DIM, 10, digit_features.apply, variables,
                        fingerprint(variables), "fd")


def fingerprint(variables: Any) -> str:
  """16 hex digits of sha256 over every leaf (its path, dtype, shape and bytes, in sorted path order):
  the key of reference statistics computed with these weights."""
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  digest = hashlib.sha256()
  for key in sorted(flat):
    leaf = np.asarray(flat[key])
    leaf = np.ascontiguousarray(leaf, dtype=leaf.dtype.newbyteorder("<"))  # Same bytes on any host.
    digest.update(f"{key}:{leaf.dtype.str}:{leaf.shape};".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()[:16]


def get(name: str, *, inception_weights: str = "", cache: str = "") -> FeatureNetwork:
  """The feature network `name` with its weights (Inception: read from `inception_weights`; digits:
  trained once and cached under `cache_dir(cache)`)."""
  if name == "inception":
    return _inception(inception_weights)
  if name == "digits":
    return _digits(os.path.join(cache_dir(cache), "feature_networks"))
  raise UserError(f"unknown feature network {name!r}; choose one of {', '.join(NETWORKS)}")


def check_images(name: str, image_shape: tuple[int, ...]) -> None:
  """Refuses images that network `name` cannot read (before any weights load or sampling)."""
  if name not in NETWORKS:
    raise UserError(f"unknown feature network {name!r}; choose one of {', '.join(NETWORKS)}")
  if name == "digits" and tuple(image_shape) != (8, 8, 1):
    raise UserError(f"the 'digits' feature network reads 8×8×1 images; these are {tuple(image_shape)}: "
                    f"use --feature_network=inception")
  if name == "inception" and image_shape[-1] not in (1, 3):
    raise UserError(f"the 'inception' feature network reads grey or RGB images; these have "
                    f"{image_shape[-1]} channels")
