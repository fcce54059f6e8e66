"""U-Net blocks traced once per signature (models/traced_once.py): the same numbers as tracing every call,
one traced program per distinct block, distinct dropout masks per block, and no trace shared across
logical axis rules."""

import flax.linen as nn
import jax
from jax.extend.core import jaxprs_in_params
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import build
from diffusion_jax.models import traced_once
from diffusion_jax.models.unet import ResBlock
from diffusion_jax.parallel import mesh as mesh_lib
from tests.conftest import perturbed, tiny_config


@pytest.fixture(scope="module")
def unet():
  """(the smoke config's U-Net, its perturbed parameters, inputs x, t, context, mask)."""
  run = build.build(tiny_config())
  model = run.model.unet
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
  t = jnp.asarray([3, 70], jnp.int32)
  context = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  params = perturbed(model.init(jax.random.PRNGKey(0), x, t, context, mask)["params"])
  return model, params, (x, t, context, mask)


def _loss_and_grads(model, params, inputs):
  return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, *inputs) ** 2)))(params)


def _each_call_traced():
  """A context in which every block call traces its own operations (the behaviour without traced_once)."""
  class Plain:
    def __enter__(self):
      self.token = traced_once._INSIDE.set(True)  # pylint: disable=protected-access

    def __exit__(self, *exc):
      traced_once._INSIDE.reset(self.token)  # pylint: disable=protected-access
  return Plain()


def test_outputs_and_gradients_equal_those_of_tracing_every_call(unet):
  model, params, inputs = unet
  out, grads = _loss_and_grads(model, params, inputs)
  with _each_call_traced():
    jax.clear_caches()
    plain_out, plain_grads = _loss_and_grads(model, params, inputs)
  assert float(out) == float(plain_out)  # The forward pass: the same operations, bit for bit.
  # The backward pass sums in another order (XLA fuses the inlined calls' reductions differently), so a
  # gradient differs by rounding relative to its leaf's scale: an element that is a near-cancelling sum
  # (measured: 4e-9 apart at 4e-5, in a leaf of scale 2e-2) differs more relative to itself.
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))


def _block_calls(jaxpr):
  """{block class name: [inner jaxpr of each call]} over the pjit equations in `jaxpr`, recursively."""
  calls = {}

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name in ("jit", "pjit") and eqn.params["name"] in ("ResBlock", "SpatialTransformer"):
        calls.setdefault(eqn.params["name"], []).append(eqn.params["jaxpr"])
      for sub in jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr)
  return calls


def test_each_distinct_block_is_traced_once(unet):
  """The smoke U-Net (16 × (1, 2) channels, 8×8 inputs, attention at the second level and the middle)
  calls ResBlock 8 times in 7 signatures — (in → out channels, size): 16→16 8², 16→32 4², 32→32 4² (the
  two middle ones), 64→32 4², 48→32 4², 48→16 8², 32→16 8² — and SpatialTransformer 4 times over the
  same 32 channels at 4×4."""
  model, params, inputs = unet
  calls = _block_calls(jax.make_jaxpr(lambda p: model.apply({"params": p}, *inputs))(params).jaxpr)
  assert len(calls["ResBlock"]) == 8 and len({id(j) for j in calls["ResBlock"]}) == 7
  assert len(calls["SpatialTransformer"]) == 4 and len({id(j) for j in calls["SpatialTransformer"]}) == 1
  with _each_call_traced():
    assert not _block_calls(jax.make_jaxpr(lambda p: model.apply({"params": p}, *inputs))(params).jaxpr)


class _TwoEqualBlocks(nn.Module):
  """Two ResBlocks with the same signature, for dropout."""

  @nn.compact
  def __call__(self, x, temb):
    return [ResBlock(4, 2, dropout=0.5, name=name)(x, temb, True) for name in ("a", "b")]


def test_blocks_of_one_signature_draw_their_own_dropout_masks():
  x, temb = jnp.ones((1, 4, 4, 4)), jnp.ones((1, 8))
  model = _TwoEqualBlocks()
  keys = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
  params = perturbed(model.init(keys, x, temb)["params"])
  params = {"a": params["a"], "b": params["a"]}  # The same weights: only the masks can tell them apart.
  apply = jax.jit(lambda key: model.apply({"params": params}, x, temb, rngs={"dropout": key}))
  a, b = apply(jax.random.PRNGKey(2))
  again_a, _ = apply(jax.random.PRNGKey(2))
  other_a, _ = apply(jax.random.PRNGKey(3))
  assert not np.array_equal(a, b)  # Each block its own mask,
  np.testing.assert_array_equal(a, again_a)  # a function of the key,
  assert not np.array_equal(a, other_a)  # which changes with the key.


def _block_constraint_specs(jaxpr):
  """The partition specs of the sharding constraints inside the traced blocks of `jaxpr`."""
  specs = set()

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name == "sharding_constraint":
        specs.add(str(eqn.params["sharding"].spec))
      for sub in jaxprs_in_params(eqn.params):
        walk(sub)
  for block_jaxprs in _block_calls(jaxpr).values():
    for block_jaxpr in block_jaxprs:
      walk(block_jaxpr.jaxpr)
  return specs


def test_a_block_traced_under_other_logical_rules_is_traced_again(unet):
  """The rules decide the blocks' sharding constraints: a trace made under one set must not be reused
  under another (JAX's own cache key knows the mesh, not Flax's rules)."""
  model, params, inputs = unet
  mesh = mesh_lib.create_mesh((1, 1, 1))
  trace = lambda: jax.make_jaxpr(lambda p: model.apply({"params": p}, *inputs))(params).jaxpr
  with mesh_lib.activate(mesh, (("batch", "data"), ("conv_out", "tensor"))):
    tensor = _block_constraint_specs(trace())
  with mesh_lib.activate(mesh, (("batch", "data"), ("conv_out", None))):
    replicated = _block_constraint_specs(trace())
  assert any("tensor" in spec for spec in tensor), tensor
  assert not any("tensor" in spec for spec in replicated), replicated


def test_an_apply_that_captures_intermediates_traces_the_blocks_as_before(unet):
  """capture_intermediates writes each submodule's output into the caller's variables: the blocks run
  their plain call, and their sublayers' outputs are captured."""
  model, params, inputs = unet
  _, state = model.apply({"params": params}, *inputs, capture_intermediates=True)
  assert "conv_1" in state["intermediates"]["down_0_res_0"]
  assert "proj_in" in state["intermediates"]["down_1_attn_0"]
