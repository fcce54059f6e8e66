"""compiler.py: the XLA options our programs are compiled with take effect and do not change results."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import compiler

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA:CPU's")


class _ConvNet(nn.Module):
  """GroupNorm → SiLU → 3×3 convolution → attention-like matmul: the U-Net's kinds of ops."""

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] → [B, H·W, C]
    h = nn.Conv(32, (3, 3))(nn.silu(nn.GroupNorm(8)(x)))
    tokens = h.reshape(h.shape[0], -1, h.shape[-1])
    return jax.nn.softmax(tokens @ tokens.swapaxes(1, 2) / 8.0) @ nn.Dense(32)(tokens)


def _loss_and_grad():
  net = _ConvNet()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 16))
  params = net.init(jax.random.PRNGKey(0), x)
  return jax.value_and_grad(lambda p: jnp.mean(net.apply(p, x) ** 2)), params


def test_cpu_options_turn_off_ynnpack_fusions(monkeypatch):
  grad_fn, params = _loss_and_grad()
  ours = compiler.jit(grad_fn).lower(params).compile().as_text()
  assert "__ynn_fusion" not in ours
  # The override keeps XLA's default: with this jaxlib that hands the convolution to YNNPACK. (If a
  # jaxlib stops doing so by default, this line fails: re-measure whether the option is still needed.)
  monkeypatch.setenv("DIFFUSION_JAX_XLA_CPU_YNN", "1")
  assert compiler.options() == {}
  assert "__ynn_fusion" in compiler.jit(grad_fn).lower(params).compile().as_text()


def test_options_change_no_result_beyond_rounding(monkeypatch):
  grad_fn, params = _loss_and_grad()
  loss, grads = compiler.jit(grad_fn)(params)
  monkeypatch.setenv("DIFFUSION_JAX_XLA_CPU_YNN", "1")
  default_loss, default_grads = compiler.jit(grad_fn)(params)
  np.testing.assert_allclose(loss, default_loss, rtol=1e-5)
  for ours, default in zip(jax.tree.leaves(grads), jax.tree.leaves(default_grads)):
    np.testing.assert_allclose(ours, default, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(default))))


def test_accelerators_get_no_options():
  assert compiler.options("gpu") == {} and compiler.options("tpu") == {}
  assert compiler.options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}
  # Donation likewise: kept where the state is most of the memory, off on a CPU (tests/test_train.py).
  assert compiler.donates_state("gpu") and compiler.donates_state("tpu") and not compiler.donates_state("cpu")


def test_a_jaxlib_without_the_options_compiles_with_its_defaults(monkeypatch):
  monkeypatch.setattr(compiler, "_CPU_OPTIONS", {"xla_cpu_no_such_option_in_any_jaxlib": ""})
  compiler._cpu_options_accepted.cache_clear()
  try:
    assert compiler.options("cpu") == {}
    grad_fn, params = _loss_and_grad()
    compiler.jit(grad_fn)(params)  # Compiles and runs.
  finally:
    compiler._cpu_options_accepted.cache_clear()
