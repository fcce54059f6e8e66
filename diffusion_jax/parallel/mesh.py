"""The device mesh (`data`, `fsdp`, `tensor`) from config, and logical-axis → mesh-axis shardings."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
from absl import logging
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


@contextlib.contextmanager
def activate(mesh: Mesh, rules) -> Iterator[None]:
  """Makes `mesh` and the logical-axis `rules` current while tracing.

  Both are needed for `nn.with_logical_constraint` to constrain anything: Flax reads the mesh from
  `jax.set_mesh` (the older `with mesh:` context leaves every constraint a silent no-op).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def logical_to_sharding(boxed_tree: Any, mesh: Mesh, rules, *, replicate_indivisible: bool = False) -> Any:
  """A pytree of NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes.

  A dimension whose size is not divisible by the mesh axes its logical name maps to is an error
  naming the array, or, with `replicate_indivisible`, is replicated (logged once per array).
  """
  logical = nn.get_partition_spec(boxed_tree)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  shapes = jax.tree.map(lambda x: tuple(x.shape), nn.unbox(boxed_tree))
  replicated_names = []

  def check(path, spec, logical_spec, shape):
    fixed = []
    for dim, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
      names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      if shape[dim] % size:
        where = jax.tree_util.keystr(path)
        if not replicate_indivisible:
          raise UserError(
              f"{where} has shape {shape}: dimension {dim} (logical axis {logical_spec[dim]!r}) of size "
              f"{shape[dim]} is not divisible by mesh axes {names} of size {size}; change "
              f"config.mesh.logical_axis_rules or the mesh, or set config.mesh.replicate_indivisible=True")
        replicated_names.append(f"{where}[{dim}]")
        axes = None
      fixed.append(axes)
    return NamedSharding(mesh, PartitionSpec(*fixed))

  shardings = jax.tree_util.tree_map_with_path(check, mesh_specs, logical, shapes, is_leaf=_is_spec)
  if replicated_names:
    logging.warning("Replicating %d indivisible dimensions: %s", len(replicated_names), replicated_names)
  return shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over data × fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
