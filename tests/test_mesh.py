import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from diffusion_jax.errors import UserError
from diffusion_jax.parallel.mesh import activate, create_mesh, resolve_mesh_shape


def test_minus_one_takes_the_remaining_devices():
  assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  assert resolve_mesh_shape((1, 1, 1), 1) == (1, 1, 1)


def test_mesh_that_does_not_match_the_devices_is_a_clear_error():
  with pytest.raises(UserError, match=r"mesh.shape=\(2, 2, 1\) has 4 devices but 8 are available"):
    resolve_mesh_shape((2, 2, 1), 8)
  with pytest.raises(UserError, match=r"do not divide the 8 available devices"):
    resolve_mesh_shape((3, -1, 1), 8)
  with pytest.raises(UserError, match="at most one -1"):
    resolve_mesh_shape((-1, -1, 1), 8)


def test_activate_makes_logical_constraints_take_effect():
  """Flax drops `with_logical_constraint` silently unless a mesh is set with jax.set_mesh."""
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  rules = (("batch", ("data", "fsdp")), ("conv_out", "tensor"))
  constrained = lambda x: nn.with_logical_constraint(x, ("batch", "conv_out"))
  x = jnp.zeros((4, 8))
  with nn.logical_axis_rules(rules):
    assert "sharding_constraint" not in str(jax.make_jaxpr(constrained)(x))  # The trap `activate` avoids.
  with activate(mesh, rules):
    jaxpr = str(jax.make_jaxpr(constrained)(x))
  assert "sharding_constraint" in jaxpr and "('data', 'fsdp'), 'tensor'" in jaxpr, jaxpr
