"""Pooled random initialization: Flax's distributions, one threefry draw per group of alike arrays, or
numpy's draws made on the host."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import initializers, layers

# std of a standard normal truncated to [-2, 2] (a closed form: 1 - 2·2·φ(2) / (2Φ(2) - 1)).
_TRUNCATED_STD = 0.87962566103423978


class _Net(nn.Module):
  """Two pairs of equal kernels (one pair per group), a lone conv, a zero-initialized conv, a table."""

  @nn.compact
  def __call__(self, x):
    h = layers.dense(256, ("embed", "mlp"), name="a")(x) + layers.dense(256, ("embed", "mlp"), name="b")(x)
    h = layers.dense(128, ("mlp", "embed"), name="c")(h) + layers.dense(128, ("mlp", "embed"), name="d")(h)
    img = h.reshape(h.shape[0], 4, 2, 16)
    img = layers.conv(64, name="conv")(img) + layers.conv(64, zero_init=True, name="zero")(img)
    table = self.param("table", initializers.normal(0.02, ("vocab", "embed")), (512, 128))
    return img.sum() + table.sum()


def _pooled_params(seed: int):
  model = _Net()
  init = lambda r: nn.unbox(model.init(r, jnp.zeros((2, 256)))["params"])
  return jax.jit(lambda r: initializers.pooled(init, r))(jax.random.PRNGKey(seed))


@pytest.mark.parametrize("shape", [(256, 128), (3, 3, 16, 64)])
def test_outside_a_pool_the_initializers_are_flaxs_own(shape):
  key = jax.random.PRNGKey(3)
  ours = nn.unbox(initializers.lecun_normal((None,) * len(shape))(key, shape))
  # Flax rounds its standard deviation to float32 twice (sqrt, then / 0.8796...), we once: last-bit differences.
  np.testing.assert_allclose(ours, nn.initializers.lecun_normal()(key, shape), rtol=1e-6)
  np.testing.assert_array_equal(nn.unbox(initializers.normal(0.02, (None, None))(key, shape[-2:])),
                                nn.initializers.normal(0.02)(key, shape[-2:]))


def test_pooled_arrays_follow_their_distributions():
  params = _pooled_params(0)
  for name, fan_in in [("a", 256), ("b", 256), ("c", 256), ("d", 256), ("conv", 3 * 3 * 16)]:
    kernel = np.asarray(params[name]["kernel"])
    stddev = np.sqrt(1.0 / fan_in)  # lecun_normal: variance 1 / fan_in
    # Sample std of n >= 9,216 draws: relative standard error ~ 1 / sqrt(2n) <= 0.74%; 5% is > 6 errors.
    # The mean's standard error is stddev / sqrt(n) <= 1% of stddev.
    assert abs(kernel.std() / stddev - 1) < 0.05, (name, kernel.std(), stddev)
    assert abs(kernel.mean()) < 0.05 * stddev
    # Truncated at two standard deviations of the untruncated normal.
    assert np.abs(kernel).max() <= 2 * stddev / _TRUNCATED_STD * (1 + 1e-6)
    np.testing.assert_array_equal(params[name]["bias"], 0.0)
  assert abs(np.asarray(params["table"]).std() / 0.02 - 1) < 0.05
  assert np.abs(np.asarray(params["table"])).max() > 3 * 0.02  # untruncated: 65,536 normal draws reach 3σ
  np.testing.assert_array_equal(params["zero"]["kernel"], 0.0)


def test_pooled_arrays_are_independent_and_a_function_of_the_seed():
  params, again, other = _pooled_params(0), _pooled_params(0), _pooled_params(1)
  jax.tree.map(np.testing.assert_array_equal, params, again)
  a, b = np.ravel(params["a"]["kernel"]), np.ravel(params["b"]["kernel"])  # 256 x 256: rows of one draw
  c = np.ravel(params["c"]["kernel"])  # 256 x 128: another group's draw
  for x, y in [(a, b), (a[:c.size], c), (a, np.ravel(other["a"]["kernel"]))]:
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.02  # independent: |r| ~ 1 / sqrt(n) <= 0.0055


def _count_primitive(jaxpr, name: str) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _count_primitive(sub, name)
  return count


def test_one_threefry_draw_per_group():
  model = _Net()
  init = lambda r: model.init(r, jnp.zeros((2, 256)))["params"]
  key = jax.random.PRNGKey(0)
  # Groups: (a, b), (c, d), conv, table. The unpooled init draws once per random array: 6.
  pooled = jax.make_jaxpr(lambda r: initializers.pooled(init, r))(key).jaxpr
  assert _count_primitive(pooled, "random_bits") == 4


def _counts_and_init():
  model = _Net()
  init = lambda r: nn.unbox(model.init(r, jnp.zeros((2, 256)))["params"])
  with initializers.recording() as counts:
    jax.eval_shape(init, jax.random.PRNGKey(0))
  return counts, init


def test_host_draws_are_a_function_of_the_key_alone_and_follow_their_distributions(monkeypatch):
  counts, _ = _counts_and_init()
  key = jax.random.PRNGKey(5)
  monkeypatch.setattr(initializers, "_HOST_CHUNK", 1000)  # Many stretches per group, unevenly divided.
  draws = initializers.draw_on_host(key, counts, threads=1)
  assert [d.shape for d in draws] == [(count, *group.shape) for group, count in counts.items()]
  # The same bits on 3 threads as on 1 (each stretch has its own stream), other bits from another key.
  jax.tree.map(np.testing.assert_array_equal, draws, initializers.draw_on_host(key, counts, threads=3))
  other = initializers.draw_on_host(jax.random.PRNGKey(6), counts, threads=2)
  assert all(np.mean(a == b) < 1e-3 for a, b in zip(draws, other))
  for (group, _), draw in zip(counts.items(), draws):
    x = draw.astype(np.float64).ravel()  # >= 9,216 draws: std's relative standard error <= 0.74%
    if group.distribution == "truncated_normal":
      assert np.abs(x).max() < 2.0 and np.abs(x).max() > 1.99  # Truncated at 2, and reaching it.
      assert abs(x.std() / _TRUNCATED_STD - 1) < 0.04, (group, x.std())
    else:
      assert abs(x.std() - 1) < 0.04 and np.abs(x).max() > 3, (group, x.std())
    assert abs(x.mean()) < 0.04
    a, b = x[: x.size // 2], x[x.size // 2: 2 * (x.size // 2)]  # Rows of one group (and stretches) independent.
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.03


def test_pooled_hands_out_the_given_draws_scaled_by_each_initializer():
  """With host draws, each random array is its row of its group's draw times the initializer's stddev
  (lecun_normal: sqrt(1 / fan_in) / the truncated std; normal: its stddev), in creation order."""
  counts, init = _counts_and_init()
  draws = initializers.draw_on_host(jax.random.PRNGKey(0), counts)
  params = jax.jit(lambda r, d: initializers.pooled(init, r, counts, d))(jax.random.PRNGKey(0), draws)
  groups = list(counts)
  row = {"a": (0, 0), "b": (0, 1), "c": (1, 0), "d": (1, 1), "conv": (2, 0), "table": (3, 0)}
  for name, (g, i) in row.items():
    value = params[name] if name == "table" else params[name]["kernel"]
    stddev = 0.02 if name == "table" else np.sqrt(1.0 / np.prod(value.shape[:-1])) / _TRUNCATED_STD
    assert groups[g].shape == value.shape
    np.testing.assert_allclose(value, draws[g][i] * np.float32(stddev), rtol=1e-6, err_msg=name)
  np.testing.assert_array_equal(params["zero"]["kernel"], 0.0)
  with pytest.raises(ValueError, match="do not match the counted groups"):
    initializers.pooled(init, jax.random.PRNGKey(0), counts, draws[:-1])


def test_an_init_function_that_changes_between_passes_is_an_error():
  calls = []

  def init(rng):
    calls.append(1)
    shapes = [(4, 4)] * len(calls)  # the second pass creates one array more than the first counted
    return [nn.unbox(initializers.lecun_normal((None, None))(rng, s)) for s in shapes]

  with pytest.raises(RuntimeError, match="deterministic"):
    initializers.pooled(init, jax.random.PRNGKey(0))


def test_counts_recorded_while_tracing_for_shapes_spare_pooled_its_counting_trace():
  """train_state traces the initializer once for the state's shapes and shardings, recording the counts
  there; `pooled` given them traces init_fn once (not twice) and draws the same bits."""
  model, key = _Net(), jax.random.PRNGKey(0)
  traces = []
  # A new function object per use: JAX caches traces by function, and a cached trace records nothing.
  new_init = lambda: lambda r: traces.append(1) or nn.unbox(model.init(r, jnp.zeros((2, 256)))["params"])
  with initializers.recording() as counts:
    jax.eval_shape(new_init(), key)
  assert list(counts.values()) == [2, 2, 1, 1] and len(traces) == 1  # (a, b), (c, d), conv, table
  init = new_init()
  with_counts = jax.jit(lambda r: initializers.pooled(init, r, counts))(key)
  assert len(traces) == 2
  init = new_init()
  jax.tree.map(np.testing.assert_array_equal, with_counts, jax.jit(lambda r: initializers.pooled(init, r))(key))
  assert len(traces) == 4  # Counting, then dispensing.
  # Counts of another function are refused, not silently misassigned.
  with initializers.recording() as other:
    jax.eval_shape(lambda r: nn.unbox(initializers.lecun_normal((None, None))(r, (256, 256))), key)
  with pytest.raises(RuntimeError, match="counts` must come from recording the same function"):
    initializers.pooled(new_init(), key, other)


def test_creating_a_train_state_traces_the_model_init_twice():
  """Once for the shapes, shardings and pooled counts, once to draw: the counting trace is shared, and a
  Run shares it between its abstract state (a training job's restore target) and its fresh state."""
  from diffusion_jax import build, train_state  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  run = build.build(tiny_config())
  traces = []
  original_init = run.model.init
  object.__setattr__(run.model, "init", lambda *a, **k: traces.append(1) or original_init(*a, **k))
  train_state.create_train_state(jax.random.PRNGKey(0), run.model, run.optimizer, run.mesh, run.rules)
  assert len(traces) == 2
  traces.clear()
  abstract = run.abstract_state()
  run.abstract_state(replicate_indivisible=True)
  state, _ = run.create_state(jax.random.PRNGKey(0))
  assert len(traces) == 2
  assert jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), abstract) == jax.tree.map(
      lambda a: (a.shape, a.dtype, a.sharding), state)
