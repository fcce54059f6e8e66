import pytest

from diffusion_jax.errors import UserError
from diffusion_jax.parallel.mesh import resolve_mesh_shape


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
