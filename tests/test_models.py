import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import build
from diffusion_jax.errors import UserError
from diffusion_jax.models import layers
from diffusion_jax.models.diffusion_model import DiffusionModel
from diffusion_jax.text.tokenizer import ByteTokenizer
from tests.conftest import randomized, tiny_config


@pytest.fixture(scope="module")
def model_and_params():
  config = tiny_config()
  model = build.create_model(config)
  tok = ByteTokenizer(config.text.max_length)
  tokens = jnp.asarray(tok.encode_batch(["a handwritten digit 3", "the number seven"]))
  x = jnp.zeros((2, 8, 8, 1))
  variables = model.init(jax.random.PRNGKey(0), x, jnp.zeros((2,), jnp.int32), {"tokens": tokens})
  return model, tok, variables


def test_every_parameter_has_logical_axis_names(model_and_params):
  _, _, variables = model_and_params
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(l, nn.Partitioned) for l in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim


def test_output_shapes(model_and_params):
  model, tok, variables = model_and_params
  params = nn.unbox(variables["params"])
  tokens = jnp.asarray(tok.encode_batch(["3"] * 4))
  cond = model.apply({"params": params}, {"tokens": tokens}, method=DiffusionModel.encode_condition)
  assert sorted(cond) == ["context", "context_mask", "pooled"]
  context, mask, pooled = cond["context"], cond["context_mask"], cond["pooled"]
  assert context.shape == (4, 32, 32) and mask.shape == (4, 32) and pooled.shape == (4, 32)
  np.testing.assert_array_equal(mask[0, :4], [True, True, True, False])
  out = model.apply({"params": params}, jnp.ones((4, 8, 8, 1)), jnp.arange(4), {"tokens": tokens})
  assert out.shape == (4, 8, 8, 1) and out.dtype == jnp.float32


def test_output_depends_on_caption_and_timestep(model_and_params):
  model, tok, variables = model_and_params
  params = randomized(nn.unbox(variables["params"]))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  t = jnp.array([10, 10])
  out_a = model.apply({"params": params}, x, t, {"tokens": jnp.asarray(tok.encode_batch(["3", "3"]))})
  out_b = model.apply({"params": params}, x, t, {"tokens": jnp.asarray(tok.encode_batch(["3", "7"]))})
  np.testing.assert_allclose(out_a[0], out_b[0], atol=1e-5)  # Same caption, same output.
  assert float(jnp.abs(out_a[1] - out_b[1]).max()) > 1e-2  # Other caption, other output.
  out_c = model.apply({"params": params}, x, jnp.array([10, 50]), {"tokens": jnp.asarray(tok.encode_batch(["3", "3"]))})
  assert float(jnp.abs(out_c[1] - out_a[1]).max()) > 1e-2


def test_attention_ignores_masked_context():
  attn = layers.MultiHeadAttention(num_heads=2, head_dim=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 8))
  ctx = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 8))
  mask = jnp.array([[True, True, False, False, False]])
  params = attn.init(jax.random.PRNGKey(2), x, ctx, mask)
  out = attn.apply(params, x, ctx, mask)
  changed = ctx.at[:, 2:].set(100.0)
  np.testing.assert_allclose(out, attn.apply(params, x, changed, mask), atol=1e-6)
  # And it matches attention over only the unmasked entries.
  np.testing.assert_allclose(out, attn.apply(params, x, ctx[:, :2], mask[:, :2]), atol=1e-6)


def test_geglu_is_one_dense_split_into_value_and_gate():
  """GEGLU computes on its kernel's halves; it is the same function, parameters and gradients as SD's
  Dense(2F) → split → value · gelu(gate), whose parameters it shares."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  geglu = layers.GEGLU(features=12)
  params = randomized(geglu.init(jax.random.PRNGKey(1), x))
  dense = layers.dense(24, ("embed", "mlp"))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, dense.init(jax.random.PRNGKey(1), x))

  def split_dense(params, x):
    value, gate = jnp.split(dense.apply(params, x), 2, axis=-1)
    return value * nn.gelu(gate)

  np.testing.assert_allclose(geglu.apply(params, x), split_dense(params, x), rtol=1e-6, atol=1e-6)
  loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
  grads = jax.grad(loss(geglu.apply), (0, 1))(params, x)
  want = jax.grad(loss(split_dense), (0, 1))(params, x)
  for got_leaf, want_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-5)


def test_sinusoidal_embedding_closed_form():
  emb = layers.sinusoidal_embedding(jnp.array([0.0, 3.0]), 8)
  freqs = 10_000.0 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(3 * freqs), np.sin(3 * freqs)]), rtol=1e-5)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_wrong_image_shape_is_a_clear_error(model_and_params):
  model, tok, variables = model_and_params
  with pytest.raises(UserError, match=r"x_t has shape \(2, 16, 16, 1\); expected \(\*, 8, 8, 1\)"):
    model.apply(variables, jnp.zeros((2, 16, 16, 1)), jnp.zeros((2,), jnp.int32),
                {"tokens": jnp.asarray(tok.encode_batch(["3", "3"]))})
