"""The train step's epilogue (clipping, AdamW, EMA, non-finite guard): array by array as optax composes it,
both against AdamW's closed form, and traced once per array signature."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import parameter_update

B1, B2, EPS, WEIGHT_DECAY, EMA_DECAY = 0.9, 0.999, 1e-8, 0.1, 0.8


def _schedule(count):
  return 1e-2 * jnp.minimum(1.0, (count + 1) / 3.0)


def _optimizer(max_grad_norm: float) -> parameter_update.ClippedElementwise:
  return parameter_update.clipped(max_grad_norm, optax.adamw(_schedule, b1=B1, b2=B2, eps=EPS,
                                                             weight_decay=WEIGHT_DECAY))


def _params(rng):
  # Arrays of one shape in different subtrees (one traced update serves them all), and others.
  return {"block": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
          "out": {"kernel": rng.normal(size=(3, 4))}, "scale": rng.normal(size=())}


def _as_f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _tree_wide(tx, grads, opt_state, params, ema, *, grad_norm, ema_decay, finite):
  del grad_norm  # optax's clipping computes it
  return parameter_update.tree_wide(tx, grads, opt_state, params, ema, ema_decay=ema_decay, finite=finite)


def _step(path, tx):
  @jax.jit
  def step(grads, opt_state, params, ema, finite):
    return path(tx, grads, opt_state, params, ema, grad_norm=optax.tree.norm(grads),
                ema_decay=jnp.float32(EMA_DECAY), finite=finite)
  return step


def _adamw_reference(grads_per_step, finite_per_step, params, max_grad_norm):
  """AdamW (decoupled weight decay, bias-corrected moments) after global-norm clipping, and the EMA, in
  float64 numpy; a non-finite step changes nothing, its count included."""
  params = jax.tree.map(np.float64, params)
  ema = jax.tree.map(lambda p: p.copy(), params)
  mu = jax.tree.map(np.zeros_like, params)
  nu = jax.tree.map(np.zeros_like, params)
  count = 0
  for grads, finite in zip(grads_per_step, finite_per_step):
    if not finite:
      continue
    grads = jax.tree.map(np.float64, grads)
    norm = np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads)))
    scale = 1.0 if norm < max_grad_norm else max_grad_norm / norm
    lr = float(_schedule(count))
    count += 1
    mu = jax.tree.map(lambda m, g: B1 * m + (1 - B1) * scale * g, mu, grads)
    nu = jax.tree.map(lambda v, g: B2 * v + (1 - B2) * (scale * g) ** 2, nu, grads)
    update = jax.tree.map(lambda m, v, p: (m / (1 - B1 ** count)) / (np.sqrt(v / (1 - B2 ** count)) + EPS)
                          + WEIGHT_DECAY * p, mu, nu, params)
    params = jax.tree.map(lambda p, u: p - lr * u, params, update)
    ema = jax.tree.map(lambda e, p: EMA_DECAY * e + (1 - EMA_DECAY) * p, ema, params)
  return params, ema, mu, nu, count


@pytest.mark.parametrize("max_grad_norm", [0.5, 100.0], ids=["clipping", "not_clipping"])
def test_per_array_update_is_adamw_and_equals_the_tree_wide_update(max_grad_norm):
  rng = np.random.default_rng(0)
  params = _as_f32(_params(rng))
  tx = _optimizer(max_grad_norm)
  grads_per_step = [_as_f32(jax.tree.map(lambda p: rng.normal(size=np.shape(p)), params)) for _ in range(5)]
  finite_per_step = [True, True, False, True, True]
  states = {"per_array": (params, params, tx.init(params)), "tree_wide": (params, params, tx.init(params))}
  steps = {"per_array": _step(parameter_update.per_array, tx), "tree_wide": _step(_tree_wide, tx)}
  for grads, finite in zip(grads_per_step, finite_per_step):
    for name, step in steps.items():
      before = states[name]
      p, e, s = states[name]
      states[name] = step(grads, s, p, e, jnp.asarray(finite))
      if not finite:  # a skipped step leaves every bit as it was
        jax.tree.map(np.testing.assert_array_equal, states[name], before)

  ours, theirs = states["per_array"], states["tree_wide"]
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)  # the checkpointed state's layout is optax's
  # The same float32 operations; XLA may fuse (and so round) the two programs differently in the last bit.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, theirs)

  params_ref, ema_ref, mu_ref, nu_ref, count = _adamw_reference(grads_per_step, finite_per_step, params,
                                                                max_grad_norm)
  new_params, new_ema, (_, (adam_state, *_)) = ours
  assert int(adam_state.count) == count == 4
  for got, want in ((new_params, params_ref), (new_ema, ema_ref), (adam_state.mu, mu_ref), (adam_state.nu, nu_ref)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), got, want)


def test_per_array_traces_one_update_per_array_signature():
  params = {f"layer{i}": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros((8,))} for i in range(20)}
  tx = _optimizer(1.0)
  args = (params, tx.init(params), params, params, jnp.asarray(True))
  jaxprs = {name: jax.make_jaxpr(lambda g, s, p, e, f: path(tx, g, s, p, e, grad_norm=jnp.float32(1.0),
                                                           ema_decay=jnp.float32(0.9), finite=f))(*args)
            for name, path in (("per_array", parameter_update.per_array),
                               ("tree_wide", _tree_wide))}
  calls = [e for e in jaxprs["per_array"].eqns if e.params.get("name") == "update_one"]
  assert len(calls) == 40  # one call per array ...
  assert len({id(e.params["jaxpr"]) for e in calls}) == 2  # ... of one traced update per signature
  traced = lambda jaxpr: len(jaxpr.eqns) + sum(len(e.params["jaxpr"].eqns) for e in jaxpr.eqns
                                               if e.primitive.name == "jit")
  # Counted with repeats of a called update once: what tracing and lowering go through.
  unique = len(jaxprs["per_array"].eqns) + sum(len(j.eqns) for j in {id(e.params["jaxpr"]): e.params["jaxpr"]
                                                                      for e in calls}.values())
  assert unique * 5 < traced(jaxprs["tree_wide"])


def test_update_goes_array_by_array_only_for_a_clipped_elementwise_optimizer():
  params = _as_f32(_params(np.random.default_rng(1)))
  plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))  # a chain that names no parts
  for tx, per_array in ((_optimizer(1.0), True), (plain, False)):
    jaxpr = jax.make_jaxpr(lambda p: parameter_update.update(
        tx, p, tx.init(p), p, p, grad_norm=jnp.float32(1.0), ema_decay=jnp.float32(0.9),
        finite=jnp.asarray(True)))(params)
    assert any(e.params.get("name") == "update_one" for e in jaxpr.eqns) == per_array
