"""The device mesh (`data`, `fsdp`, `tensor`) from config, and logical-axis → mesh-axis shardings."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.config import MESH_AXES
from diffusion_jax.errors import UserError


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one −1 by the remaining factor; checks that the product is `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise UserError(f"mesh.shape={shape}: sizes must be positive, with at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise UserError(f"mesh.shape={shape}: the fixed sizes (product {known}) do not divide the "
                      f"{num_devices} available devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise UserError(f"mesh.shape={shape} has {int(np.prod(shape))} devices but {num_devices} are "
                    f"available; the product of (data, fsdp, tensor) must equal the device count")
  return shape


def create_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(shape, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_rules(config) -> tuple[tuple[str, Any], ...]:
  """config.mesh.logical_axis_rules as the tuple-of-pairs Flax expects (JSON gives lists)."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.mesh.logical_axis_rules)


def logical_to_sharding(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """A pytree of NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over data × fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
