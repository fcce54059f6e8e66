"""Learned reverse variances and L_hybrid (improved DDPM, Nichol & Dhariwal 2021) on exact cases.

The exact case: 1-D Gaussian data x_0 ~ N(μ, s²), s² < 1. Then x_t ~ N(√ᾱ_t·μ, ᾱ_t·s² + 1 − ᾱ_t),
x_0 | x_t is Gaussian with Var[x_0 | x_t] = s²(1 − ᾱ_t)/(ᾱ_t·s² + 1 − ᾱ_t), and the true reverse step
q(x_{t−1} | x_t) = ∫ q(x_{t−1} | x_t, x_0) q(x_0 | x_t) dx_0 is Gaussian with mean μ̃_t(E[x_0 | x_t], x_t)
and variance σ*_t² = β̃_t + c1²·Var[x_0 | x_t], c1 = √ᾱ_{t−1}·β_t/(1 − ᾱ_t). σ*² grows with s² from β̃_t
(s = 0) to β_t (s = 1), so eq. 15 reaches it with some v* ∈ [−1, 1]. A model with the exact ε and v*
is the true reverse process: its sampler is exact and its bound's KL terms are as small as they can be.

Note that KL(q(x_{t−1} | x_t, x_0) ‖ p(x_{t−1} | x_t)) of one sample is not 0 even then (p cannot know
x_0): what vanishes is KL(q(x_{t−1} | x_t) ‖ p); the term's expectation over x_0 | x_t is ½·log(σ*²/β̃_t)
nats, the least any variance achieves. Expectations over x_0 | x_t are taken by Gauss–Hermite quadrature,
exact here because each term is quadratic in x_0.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from configs import ddpm_cifar10, iddpm_cifar10
from diffusion_jax import build, inference, train_state
from diffusion_jax import config as config_lib
from diffusion_jax.data import pipeline
from diffusion_jax.diffusion import losses, samplers, schedules, vlb
from diffusion_jax.errors import UserError
from diffusion_jax.metrics import sample_quality
from tests.conftest import tiny_config

LN2 = np.log(2.0)
T = 1000
SCHEDULE = schedules.make_schedule("cosine", T)
MU, STD = 0.1, 0.3
# Probabilists' Gauss–Hermite rule: Σ w_i f(m + √V·z_i) = E f(N(m, V)) for polynomials of degree < 2·8.
GH_Z, GH_W = np.polynomial.hermite_e.hermegauss(8)
GH_W = GH_W / GH_W.sum()


def _chain(schedule):
  """float64 β_t, ᾱ_t, ᾱ_{t−1} (ᾱ_{−1} = 1) and β̃_t of the schedule's float32 β's."""
  betas = np.asarray(schedule.betas, np.float64)
  abar = np.exp(np.cumsum(np.log1p(-betas)))
  abar_prev = np.append(1.0, abar[:-1])
  return betas, abar, abar_prev, betas * (1 - abar_prev) / (1 - abar)


def _true_reverse(a, a_prev, x_t):
  """The exact q(x_prev | x_t) of the Gaussian data between any two noise levels ᾱ_t = a < ᾱ_prev = a_prev
  (consecutive, or consecutive steps of a respaced chain): (mean, σ*², β, β̃, E[x0|x_t], Var[x0|x_t])."""
  beta = 1 - a / a_prev
  var_x0 = STD**2 * (1 - a) / (a * STD**2 + 1 - a)
  mean_x0 = MU + STD**2 * np.sqrt(a) * (x_t - np.sqrt(a) * MU) / (a * STD**2 + 1 - a)
  c1, c2 = np.sqrt(a_prev) * beta / (1 - a), np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
  beta_tilde = beta * (1 - a_prev) / (1 - a)
  return c1 * mean_x0 + c2 * x_t, beta_tilde + c1**2 * var_x0, beta, beta_tilde, mean_x0, var_x0


def _v_star(var, beta, log_beta_tilde):
  """Eq. 15 solved for the raw output: log σ² = frac·log β + (1 − frac)·log β̃, v = 2·frac − 1."""
  return 2 * (np.log(var) - log_beta_tilde) / (np.log(beta) - log_beta_tilde) - 1


def _exact_v_full_chain(schedule):
  """v*_t [T] of the full chain (β̃ clipped to β̃_1 at t = 0, as the model's interpolation does)."""
  betas, abar, abar_prev, beta_tilde = _chain(schedule)
  _, var, _, _, _, _ = _true_reverse(abar, abar_prev, 0.0)
  log_bt = np.log(np.where(np.arange(len(betas)) == 0, beta_tilde[1], beta_tilde))
  return _v_star(var, betas, log_bt)


def exact_eps(x_t, t, schedule=SCHEDULE):
  """E[ε | x_t] for x_0 ~ N(MU, STD²)."""
  a = losses._bcast(schedule.alphas_cumprod[t], x_t)
  return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * MU) / (a * STD**2 + 1 - a)


def _with_v(eps, v):
  """The 2·C-channel output [ε, v] (v broadcast over the pixels)."""
  return jnp.concatenate([eps, jnp.broadcast_to(v, eps.shape)], axis=-1)


# ---------- eq. 15 ----------

@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_interpolation_endpoints_and_geometric_mean(name):
  s = schedules.make_schedule(name, T)
  betas, _, _, beta_tilde = _chain(s)
  ts = np.array([0, 1, 2, 10, 100, 500, 998, 999])
  log_bt = np.log(np.where(ts == 0, beta_tilde[1], beta_tilde[ts]))  # β̃_0 = 0: clipped to β̃_1.
  t = jnp.asarray(ts, jnp.int32)
  for v, want in ((1.0, np.log(betas[ts])), (-1.0, log_bt), (0.0, 0.5 * (np.log(betas[ts]) + log_bt))):
    got = vlb.learned_log_variance(s, jnp.full((len(ts), 1), v), t)[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # p_mean_variance reads the last C channels and returns the same variance.
  x_t = jnp.zeros((len(ts), 1))
  _, var, log_var, _ = vlb.p_mean_variance(_with_v(x_t, 0.0), x_t, t, s, "eps", "learned")
  np.testing.assert_allclose(var[:, 0], np.sqrt(betas[ts] * np.exp(log_bt)), rtol=1e-4)
  np.testing.assert_allclose(np.exp(log_var), var, rtol=1e-6)


def test_split_output_and_channel_errors():
  x = jnp.zeros((2, 4, 4, 3))
  out = jnp.arange(2 * 4 * 4 * 6, dtype=jnp.float32).reshape(2, 4, 4, 6)
  pred, v = losses.split_output(out, x)
  np.testing.assert_array_equal(pred, out[..., :3])
  np.testing.assert_array_equal(v, out[..., 3:])
  assert losses.split_output(out[..., :3], x)[1] is None
  with pytest.raises(ValueError, match="5 channels; expected 3"):
    losses.split_output(out[..., :5], x)
  with pytest.raises(ValueError, match="model_variance='learned'"):
    vlb.p_mean_variance(out[..., :3], x, jnp.zeros((2,), jnp.int32), SCHEDULE, "eps", "learned")


# ---------- the exact Gaussian case: the bound ----------

def test_exact_model_is_the_true_reverse_process():
  """ε̂ = E[ε | x_t] and v = v*_t: the model's p(x_{t−1} | x_t) is q(x_{t−1} | x_t) at every t ≥ 1."""
  _, abar, abar_prev, _ = _chain(SCHEDULE)
  v_star = _exact_v_full_chain(SCHEDULE)
  assert np.all(np.abs(v_star[1:]) <= 1)  # σ*² ∈ [β̃_t, β_t] for s² < 1.
  ts = np.arange(1, T)
  z = np.linspace(-2.5, 2.5, 5)  # Five x_t per t, across the marginal's bulk.
  x_t = np.sqrt(abar[ts, None]) * MU + np.sqrt(abar[ts, None] * STD**2 + 1 - abar[ts, None]) * z
  mean, var, _, _, _, _ = _true_reverse(abar[ts, None], abar_prev[ts, None], x_t)
  t = jnp.asarray(ts, jnp.int32)
  xt = jnp.asarray(x_t, jnp.float32)[..., None]  # [T−1, 5 pixels, 1 channel]
  output = _with_v(exact_eps(xt, t), jnp.asarray(v_star[ts], jnp.float32)[:, None, None])
  p_mean, p_var, p_log_var, _ = jax.jit(vlb.p_mean_variance, static_argnums=(4, 5))(
      output, xt, t, SCHEDULE, "eps", "learned")
  m2, lv2 = np.asarray(p_mean[..., 0], np.float64), np.asarray(p_log_var[..., 0], np.float64)
  lv1 = np.log(var)
  kl = 0.5 * (lv2 - lv1 + np.expm1(lv1 - lv2) + (mean - m2) ** 2 * np.exp(-lv2))  # normal_kl, in float64.
  print(f"max KL(q(x_t-1|x_t) || p) over t = 1..{T - 1}: {kl.max():.2e} nats")
  assert kl.max() < 1e-6
  np.testing.assert_allclose(p_var[..., 0], np.broadcast_to(var, p_var.shape[:-1]), rtol=2e-5)


def _schedule64(schedule):
  """`schedule` in float64, with ᾱ from its float32 β's as `_chain` computes it (under jax.enable_x64)."""
  betas, abar, _, _ = _chain(schedule)
  return schedules.NoiseSchedule(jnp.asarray(betas), jnp.asarray(abar))


def _expected_terms(model_variance, ts, v=None):
  """E_{x0 | x_t}[L_t] in bits for the exact ε at one x_t per t (Gauss–Hermite over x_0), via vlb_terms.

  In float64: at small t the learned and the fixed-large variance are ~1e-7 of L_t apart (t = 1: 7.8e-8
  bits of 0.54), below the ~1e-6 relative rounding of float32 terms."""
  _, abar, abar_prev, _ = _chain(SCHEDULE)
  x_t = np.sqrt(abar[ts]) * MU + 0.7 * np.sqrt(abar[ts] * STD**2 + 1 - abar[ts])
  _, _, _, _, mean_x0, var_x0 = _true_reverse(abar[ts], abar_prev[ts], x_t)
  x0 = mean_x0[:, None] + np.sqrt(var_x0)[:, None] * GH_Z  # [len(ts), nodes]
  shape = (len(ts) * len(GH_Z), 1)
  with jax.enable_x64(True):
    schedule = _schedule64(SCHEDULE)
    t = jnp.asarray(np.repeat(ts, len(GH_Z)), jnp.int32)
    xt = jnp.asarray(np.repeat(x_t, len(GH_Z))).reshape(shape)
    output = exact_eps(xt, t, schedule)
    if v is not None:
      output = _with_v(output, jnp.asarray(np.repeat(v, len(GH_Z)))[:, None])
    terms = jax.jit(vlb.vlb_terms, static_argnums=(5, 6))(
        output, jnp.asarray(x0).reshape(shape), xt, t, schedule, "eps", model_variance)
    assert terms.dtype == jnp.float64
    return np.asarray(terms).reshape(len(ts), -1) @ GH_W


def test_expected_kl_terms_in_closed_form_and_learned_is_smallest():
  """E[L_t] = ½(log(σ_p²/β̃_t) + σ*²/σ_p² − 1) nats for a model variance σ_p² and the exact mean:
  ½·log(σ*²/β̃_t) with the exact v (its minimum over σ_p²), ½·c1²Var/β̃_t with β̃_t, and with β_t the
  formula itself."""
  _, abar, abar_prev, _ = _chain(SCHEDULE)
  ts = np.array([1, 2, 5, 10, 30, 100, 300, 600, 900, 998])
  _, var, beta, beta_tilde, _, _ = _true_reverse(abar[ts], abar_prev[ts], 0.0)
  closed = {"learned": 0.5 * np.log(var / beta_tilde) / LN2,
            "fixed_small": 0.5 * (var / beta_tilde - 1) / LN2,
            "fixed_large": 0.5 * (np.log(beta / beta_tilde) + var / beta - 1) / LN2}
  got = {"learned": _expected_terms("learned", ts, _exact_v_full_chain(SCHEDULE)[ts]),
         "fixed_small": _expected_terms("fixed_small", ts), "fixed_large": _expected_terms("fixed_large", ts)}
  for name in closed:
    print(name, "E[L_t] bits:", np.array2string(got[name], precision=3), "closed form:",
          np.array2string(closed[name], precision=3))
    np.testing.assert_allclose(got[name], closed[name], rtol=1e-9, atol=0, err_msg=name)
  # In float64 (`_expected_terms`), so the ordering holds where the gap is 1e-7 of the term (t = 1).
  assert np.all(got["learned"] < got["fixed_small"]) and np.all(got["learned"] < got["fixed_large"])


def test_full_bound_of_the_exact_model_matches_its_closed_form():
  """bits_per_dim (all T terms, one noise draw per t) averaged over many pixels against the expected bound:
  L_T + Σ_{t≥1} ½·log(σ*²/β̃_t) + E[L_0], where L_0's mean x̂_0 = E[x_0 | x_0's noisy version] misses x_0 by
  z ~ N(0, Var_0), so E[L_0] = E_z[−log(Φ((z + h)/σ_0) − Φ((z − h)/σ_0))], h = 1/255, σ_0² the model's
  variance at t = 0 (one 1-D integral). Fixed variances, on the same draws, give larger bounds."""
  s = schedules.make_schedule("cosine", 200)  # Fewer terms: the same algebra at 1/5 of the cost.
  betas, abar, abar_prev, beta_tilde = _chain(s)
  v_star = _exact_v_full_chain(s)
  _, var, _, _, _, var_x0 = _true_reverse(abar, abar_prev, 0.0)
  sigma0_sq = np.exp(0.5 * (v_star[0] + 1) * np.log(betas[0]) + 0.5 * (1 - v_star[0]) * np.log(beta_tilde[1]))
  h = 1 / 255
  sd0, sd_miss = np.sqrt(sigma0_sq), np.sqrt(var_x0[0])
  # The bin mass, mirrored to the lower tail (symmetric in z) so it keeps its digits far out.
  mass = lambda z: stats.norm.sf((abs(z) - h) / sd0) - stats.norm.sf((abs(z) + h) / sd0)
  decoder = 2 * integrate.quad(lambda z: -np.log(mass(z)) * stats.norm.pdf(z, 0, sd_miss), 0, 10 * sd_miss)[0]
  prior = 0.5 * (abar[-1] * (MU**2 + STD**2) + (1 - abar[-1]) - 1 - np.log(1 - abar[-1]))
  expected = (prior + 0.5 * np.log(var[1:] / beta_tilde[1:]).sum() + decoder) / LN2

  x0 = MU + STD * jax.random.normal(jax.random.PRNGKey(0), (512, 256, 1))  # Continuous: no edge bins.
  v_table = jnp.asarray(v_star, jnp.float32)

  def predict(x_t, t):
    return _with_v(exact_eps(x_t, t, s), v_table[t][:, None, None])

  bpd = jax.jit(lambda variance: vlb.bits_per_dim(predict, x0, s, jax.random.PRNGKey(1), prediction_type="eps",
                                                  model_variance=variance), static_argnums=0)
  learned = np.asarray(bpd("learned"), np.float64)
  sem = learned.std(ddof=1) / np.sqrt(len(learned))
  small, large = np.asarray(bpd("fixed_small")).mean(), np.asarray(bpd("fixed_large")).mean()
  print(f"bits/dim: learned {learned.mean():.5f} ± {sem:.5f} (closed form {expected:.5f}), "
        f"fixed_small {small:.5f}, fixed_large {large:.5f}")
  assert abs(learned.mean() - expected) < 4 * sem
  assert learned.mean() < small and learned.mean() < large


# ---------- L_hybrid ----------

@pytest.mark.parametrize("t", [1, 10, 100, 300])  # v* = 0.999, 0.986, 0.557, −0.367.
def test_vlb_part_of_the_hybrid_loss_is_minimized_at_the_exact_v(t):
  """E_{x0|x_t}[T·L_t] as a function of the (broadcast) v, through `hybrid_loss_terms`: zero slope at v*,
  larger at v* ± 0.1 (where the slope is ± and ≥ 1e8 times the slope at v*).

  In float64, with the schedule's ᾱ from its float32 β's as `_chain` computes them: at t = 300 the bound
  rises by 2.4e-5 of its value from v* to v* ± 0.1, and float32 cannot resolve that. The mean term
  (μ̃ − μ)²·e^(−log σ²) cancels 0.13 − 0.12 and scales the difference by ~600, so one ulp of either mean
  moves T·L_t by ~1.5e-5 of its value: compiled with and without LLVM's optimizations, the float32
  bound at v* − 0.1 came out on either side of the bound at v*."""
  _, abar, abar_prev, _ = _chain(SCHEDULE)
  v_star = _exact_v_full_chain(SCHEDULE)[t]
  x_t = np.sqrt(abar[t]) * MU - 0.4 * np.sqrt(abar[t] * STD**2 + 1 - abar[t])
  _, _, _, _, mean_x0, var_x0 = _true_reverse(abar[t], abar_prev[t], x_t)
  n = len(GH_Z)
  with jax.enable_x64(True):
    schedule = _schedule64(SCHEDULE)
    x0 = jnp.asarray(mean_x0 + np.sqrt(var_x0) * GH_Z)[:, None]
    xt = jnp.full((n, 1), x_t)
    tt = jnp.full((n,), t, jnp.int32)
    noise = (xt - jnp.sqrt(abar[t]) * x0) / jnp.sqrt(1 - abar[t])  # The ε that made x_t from each x_0.
    eps_hat = exact_eps(xt, tt, schedule)
    w = jnp.asarray(GH_W)
    assert x0.dtype == eps_hat.dtype == w.dtype == jnp.float64

    @jax.jit
    @jax.value_and_grad
    def expected_vlb(v):
      _, l_vlb = losses.hybrid_loss_terms(_with_v(eps_hat, v), x0, xt, tt, noise, schedule, "eps")
      return jnp.sum(w * l_vlb)

    (at, g_at), (lo, g_lo), (hi, g_hi) = [map(float, expected_vlb(jnp.float64(v)))
                                          for v in (v_star, v_star - 0.1, v_star + 0.1)]
  print(f"t={t}: v*={v_star:.4f}; E[T·L_t] at v*-0.1, v*, v*+0.1 = {lo:.8f}, {at:.8f}, {hi:.8f}; "
        f"slopes {g_lo:.3e}, {g_at:.3e}, {g_hi:.3e}")
  assert lo > at and hi > at
  assert g_lo < 0 < g_hi
  assert abs(g_at) < 1e-8 * min(-g_lo, g_hi)


def test_stop_gradient_splits_the_hybrid_loss():
  """∂L_vlb/∂(prediction) = 0 exactly, ∂L_vlb/∂v ≠ 0, ∂L_simple/∂v = 0 exactly (iDDPM §3.1)."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
  x0 = jnp.asarray(np.arange(256) / 127.5 - 1, jnp.float32)[jax.random.randint(k1, (6, 4, 4, 3), 0, 256)]
  noise = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 1, 5, 50, 500, 999], jnp.int32)
  x_t = losses.q_sample(x0, SCHEDULE.alphas_cumprod[t], noise)
  output = jax.random.normal(k3, x0.shape[:-1] + (6,))
  for prediction_type in losses.PREDICTION_TYPES:
    parts = lambda out: losses.hybrid_loss_terms(out, x0, x_t, t, noise, SCHEDULE, prediction_type,
                                                 weighting="min_snr")
    g_simple = jax.grad(lambda out: parts(out)[0].sum())(output)
    g_vlb = jax.grad(lambda out: parts(out)[1].sum())(output)
    assert np.all(np.asarray(g_vlb[..., :3]) == 0.0), prediction_type
    assert np.all(np.asarray(g_simple[..., 3:]) == 0.0), prediction_type
    assert np.all(np.abs(np.asarray(g_vlb[..., 3:])).reshape(6, -1).max(axis=1) > 0), prediction_type
    assert np.abs(np.asarray(g_simple[..., :3])).max() > 0
  # The total is L_simple + λ·T·L_t, and L_simple is exactly the fixed-variance loss of the prediction.
  predict2 = lambda x, tt: output
  total = losses.per_example_loss(predict2, x0, t, noise, SCHEDULE, "eps", learn_sigma=True, vlb_weight=0.001)
  simple, l_vlb = losses.hybrid_loss_terms(output, x0, x_t, t, noise, SCHEDULE, "eps")
  np.testing.assert_allclose(total, simple + 0.001 * l_vlb, rtol=1e-6)
  plain = losses.per_example_loss(lambda x, tt: output[..., :3], x0, t, noise, SCHEDULE, "eps")
  np.testing.assert_array_equal(simple, plain)
  terms = vlb.vlb_terms(output, x0, x_t, t, SCHEDULE, "eps", "learned")
  np.testing.assert_allclose(l_vlb, T * terms, rtol=1e-6)


# ---------- sampling ----------

def _sample(denoise, options, n, seed=0, schedule=SCHEDULE, cond=None, uncond=None, scale=1.0):
  x_T = jax.random.normal(jax.random.PRNGKey(seed), (n, 1, 1, 1))
  cond = {} if cond is None else cond
  return np.asarray(samplers.sample(denoise, schedule, x_T, cond, uncond, jnp.full((n,), scale),
                                    jax.random.PRNGKey(seed + 1), options)).ravel()


def _respaced_v(num_steps):
  """v* [T] for the chain of `num_steps` linspace steps: at each visited t, eq. 15 solved between that
  chain's β' = 1 − ᾱ_t/ᾱ_prev and β̃' (β̃' of the step before the data at the last one, as the sampler)."""
  _, abar, _, _ = _chain(SCHEDULE)
  ts = samplers.timesteps("linspace", T, num_steps)
  a, a_prev = abar[ts], np.append(abar[ts[1:]], 1.0)
  _, var, beta, beta_tilde, _, _ = _true_reverse(a, a_prev, 0.0)
  log_bt = np.log(beta_tilde[:-1])
  v = np.zeros(T)
  v[ts[:-1]] = _v_star(var[:-1], beta[:-1], log_bt)  # The last step adds no noise: its v is unused.
  return v


@pytest.mark.parametrize("num_steps", [T, 50])
def test_ddpm_with_the_exact_learned_variance_samples_the_data(num_steps):
  """Every step draws from the exact q(x_prev | x_t) of its chain, so the samples are N(μ, s²) up to
  sampling error: standard errors at n = 20k are 0.0021 (mean) and 0.0015 (std). With σ² = β̃' (or β')
  the 50-step chain is measurably too narrow (too wide). Measured: 1000 steps 0.1006 / 0.3003, 50 steps
  0.1012 / 0.3011 (the full chain's v* reused: 0.1012 / 0.2999); fixed σ² at 50 steps: std 0.2729 (β̃'),
  0.3128 (β')."""
  n = 20_000
  v_table = jnp.asarray(_exact_v_full_chain(SCHEDULE) if num_steps == T else _respaced_v(num_steps), jnp.float32)
  learned = lambda x, t, cond: _with_v(exact_eps(x, t), v_table[t][:, None, None, None])
  options = samplers.SamplerOptions("ddpm", num_steps, x0_clipping="none")
  x = _sample(learned, options, n)
  print(f"{num_steps} steps, learned σ²: mean {x.mean():.4f} (want {MU}), std {x.std():.4f} (want {STD})")
  assert abs(x.mean() - MU) < 0.009 and abs(x.std() - STD) < 0.0065
  if num_steps == 50:
    # What a trained model does (§4): its v is the full chain's, reinterpreted between this chain's β̃' and β'.
    full_v = jnp.asarray(_exact_v_full_chain(SCHEDULE), jnp.float32)
    reused = _sample(lambda x, t, cond: _with_v(exact_eps(x, t), full_v[t][:, None, None, None]), options, n)
    print(f"50 steps, the full chain's v*: mean {reused.mean():.4f}, std {reused.std():.4f}")
    assert abs(reused.mean() - MU) < 0.009 and abs(reused.std() - STD) < 0.0065
    fixed = lambda x, t, cond: exact_eps(x, t)
    small = _sample(fixed, dataclasses.replace(options, ddpm_variance="small"), n).std()
    large = _sample(fixed, dataclasses.replace(options, ddpm_variance="large"), n).std()
    print(f"50 steps, fixed σ²: std small {small:.4f}, large {large:.4f}")
    assert small < STD - 0.01 and large > STD + 0.01


def test_guidance_combines_predictions_and_keeps_the_conditional_variance():
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(5), 4)
  pred_c, pred_u = jax.random.normal(k1, (4, 3, 3, 2)), jax.random.normal(k2, (4, 3, 3, 2))
  var_c, var_u = jax.random.uniform(k3, (4, 3, 3, 2), minval=-1, maxval=1), jax.random.normal(k4, (4, 3, 3, 2))
  both = jnp.concatenate([jnp.concatenate([pred_c, var_c], -1), jnp.concatenate([pred_u, var_u], -1)])
  denoise = lambda x, t, cond: both
  x, t, scale = jnp.zeros((4, 3, 3, 2)), jnp.zeros((4,), jnp.int32), jnp.array([0.0, 1.0, 3.0, 7.5])
  out = samplers.guided_output(denoise, x, t, {"c": jnp.ones(4)}, {"c": jnp.zeros(4)}, scale)
  s = scale[:, None, None, None]
  np.testing.assert_allclose(out[..., :2], pred_u + s * (pred_c - pred_u), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[..., 2:], var_c)
  rescaled = samplers.guided_output(denoise, x, t, {"c": jnp.ones(4)}, {"c": jnp.zeros(4)}, scale, 1.0)
  np.testing.assert_allclose(np.std(np.asarray(rescaled[..., :2]).reshape(4, -1), axis=1),
                             np.std(np.asarray(pred_c).reshape(4, -1), axis=1), rtol=1e-5)
  np.testing.assert_array_equal(rescaled[..., 2:], var_c)


def test_guided_sampling_uses_the_conditional_branch_variance():
  """Equal-variance Gaussians: u + s(c − u) is the exact ε of N(μ_u + s(μ_c − μ_u), s²), whose v* is the
  conditional one. The unconditional branch's v channels must not matter (bitwise), whatever they are."""
  v_table = jnp.asarray(_respaced_v(50), jnp.float32)

  def denoise(v_uncond):
    def fn(x, t, cond):
      a = SCHEDULE.alphas_cumprod[t][:, None, None, None]
      mu = cond["mean"][:, None, None, None]
      eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * STD**2 + 1 - a)
      v = jnp.where(cond["is_c"][:, None, None, None], v_table[t][:, None, None, None], v_uncond)
      return _with_v(eps, v)
    return fn

  n = 4000
  cond = {"mean": jnp.full((n,), 0.2), "is_c": jnp.ones((n,), bool)}
  uncond = {"mean": jnp.full((n,), -0.1), "is_c": jnp.zeros((n,), bool)}
  options = samplers.SamplerOptions("ddpm", 50, x0_clipping="none")
  a = _sample(denoise(0.0), options, n, cond=cond, uncond=uncond, scale=3.0)
  b = _sample(denoise(25.0), options, n, cond=cond, uncond=uncond, scale=3.0)
  np.testing.assert_array_equal(a, b)
  assert abs(a.mean() - (-0.1 + 3.0 * 0.3)) < 0.02 and abs(a.std() - STD) < 0.015


def test_ddim_and_dpm_solver_read_only_the_prediction_channels():
  for sampler in ("ddim", "dpm_solver_pp_2m"):
    options = samplers.SamplerOptions(sampler, 20, x0_clipping="none")
    plain = _sample(lambda x, t, c: exact_eps(x, t), options, 64)
    with_v = _sample(lambda x, t, c: _with_v(exact_eps(x, t), 0.7), options, 64)
    np.testing.assert_array_equal(plain, with_v)


# ---------- config, model, training ----------

def _improved_diffusion_unet_parameters(ch=128, mult=(1, 2, 2, 2), num_res_blocks=3, attention_ds=(2, 4),
                                        in_channels=3, out_channels=6, scale_shift_norm=True):
  """improved-diffusion's UNetModel (unet.py) parameter count, layer by layer as its __init__ builds it."""
  conv = lambda ci, co, k=3: k * k * ci * co + co
  linear = lambda i, o: i * o + o
  norm = lambda c: 2 * c
  emb = 4 * ch

  def res(ci, co):
    skip = conv(ci, co, 1) if ci != co else 0
    return norm(ci) + conv(ci, co) + linear(emb, 2 * co if scale_shift_norm else co) + norm(co) + conv(co, co) + skip

  attention = lambda c: norm(c) + linear(c, 3 * c) + linear(c, c)
  n = linear(ch, emb) + linear(emb, emb) + conv(in_channels, ch)
  chans, cur, ds = [ch], ch, 1
  for level, m in enumerate(mult):
    for _ in range(num_res_blocks):
      n, cur = n + res(cur, m * ch), m * ch
      n += attention(cur) if ds in attention_ds else 0
      chans.append(cur)
    if level != len(mult) - 1:
      n, ds = n + conv(cur, cur), ds * 2
      chans.append(cur)
  n += res(cur, cur) + attention(cur) + res(cur, cur)
  for level, m in list(enumerate(mult))[::-1]:
    for i in range(num_res_blocks + 1):
      n, cur = n + res(cur + chans.pop(), m * ch), m * ch
      n += attention(cur) if ds in attention_ds else 0
      if level and i == num_res_blocks:
        n, ds = n + conv(cur, cur), ds // 2
  return n + norm(cur) + conv(ch, out_channels)


def _count(config):
  model = build.create_model(config)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *model.dummy_inputs()))
  out = jax.eval_shape(lambda: model.apply(model.init(jax.random.PRNGKey(0), *model.dummy_inputs()),
                                           *model.dummy_inputs()))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(variables)), out.shape


def test_iddpm_cifar10_config_is_the_papers():
  c = iddpm_cifar10.get_config()
  config_lib.validate(c)
  assert (c.dataset.name, c.dataset.image_size, c.model.conditioning) == ("cifar10", 32, "none")
  assert c.diffusion.learn_sigma is True and c.diffusion.vlb_weight == 0.001
  assert (c.diffusion.num_timesteps, c.diffusion.beta_schedule, c.diffusion.prediction_type) == (4000, "cosine", "eps")
  assert c.diffusion.loss_weighting == "uniform"
  u = c.model.unet
  assert (u.channels, tuple(u.channel_mult), u.num_res_blocks) == (128, (1, 2, 2, 2), 3)
  assert tuple(u.transformer_depth) == (0, 1, 1, 0) and u.mid_transformer_depth == 1  # 16×16, 8×8, middle.
  assert (u.attention_type, u.num_heads, u.norm_groups) == ("self", 4, 32)
  assert u.scale_shift_norm is True and u.resblock_updown is False and u.dropout == 0.3
  o = c.optimizer
  assert (o.learning_rate, o.schedule, o.warmup_steps, o.weight_decay) == (1e-4, "constant", 0, 0.0)
  assert o.ema_decay == 0.9999
  assert (o.b1, o.b2) == (0.9, 0.999) and o.grad_clip_norm >= 1e9
  assert (c.batch_size, c.num_train_steps) == (128, 500_000)
  assert (c.sampling.sampler, c.sampling.num_steps) == ("ddpm", 4000)
  # The network, to the parameter: improved-diffusion's UNetModel for these flags (52,546,438), whose
  # counting function reproduces DDPM's 35,746,307 for DDPM's flags.
  assert _improved_diffusion_unet_parameters(num_res_blocks=2, attention_ds=(2,), out_channels=3,
                                             scale_shift_norm=False) == _count(ddpm_cifar10.get_config())[0]
  params, shape = _count(c)
  assert params == _improved_diffusion_unet_parameters() == 52_546_438
  assert shape == (1, 32, 32, 6)


def test_learn_sigma_doubles_the_output_channels():
  c = tiny_config()
  _, plain = _count(c)
  c.diffusion.learn_sigma = True
  _, doubled = _count(c)
  assert plain == (1, 8, 8, 1) and doubled == (1, 8, 8, 2)


def test_bad_values_are_user_errors():
  c = tiny_config()
  c.diffusion.vlb_weight = -0.1
  with pytest.raises(UserError, match=r"config.diffusion.vlb_weight=-0.1 must be in \[0, inf\)"):
    config_lib.validate(c)
  c.diffusion.vlb_weight = float("nan")
  with pytest.raises(UserError, match="config.diffusion.vlb_weight=nan must be a finite number"):
    config_lib.validate(c)


def test_a_learned_sigma_model_trains(config, monkeypatch):
  """A few real steps of the tiny model with L_hybrid: finite losses, and the variance head (the last C
  output channels of conv_out, which only L_vlb reaches) moves. Then its NLL, as `evaluate` computes it."""
  from diffusion_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
  config.diffusion.learn_sigma = True
  run = build.build(config)
  state, _ = train_state.create_train_state(jax.random.PRNGKey(0), run.model, run.optimizer, run.mesh, run.rules)
  null_inputs = jax.tree.map(jnp.asarray, run.conditioning.null_inputs(1))
  step = jax.jit(lambda s, b: train_step_lib.train_step(s, b, model=run.model, tx=run.optimizer,
                                                        schedule=run.schedule, config=config,
                                                        autoencoder=run.autoencoder, null_inputs=null_inputs))
  it = pipeline.create_train_iterator(config, tokenizer=run.conditioning.tokenizer)
  kernel = lambda s: np.asarray(s.params["unet"]["conv_out"]["kernel"])
  before = kernel(state)
  for _ in range(3):
    batch = next(it)
    state, metrics = step(state, {k: jnp.asarray(batch[k]) for k in ("image", "tokens")})
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped_nonfinite"]) == 0
  after = kernel(state)
  assert after.shape[-1] == 2
  assert np.abs(after[..., 1] - before[..., 1]).max() > 0

  # evaluate's NLL: by default ('auto') a learned-Σ run's bound uses its own variance. One eval batch.
  first = next(pipeline.iterate_split(config, run.dataset.eval_split, tokenizer=run.conditioning.tokenizer))
  monkeypatch.setattr(pipeline, "iterate_split", lambda *args, **kwargs: iter([first]))
  loaded = inference.LoadedModel(run, state.params, 3)
  nll = {v: sample_quality.nll_bits_per_dim(loaded, num_timesteps=4, model_variance=v,
                                            batch_size=len(first["image"]))["nll_bits_per_dim"]
         for v in ("auto", "learned", "fixed_large")}
  predict = lambda x_t, t: run.model.apply({"params": state.params}, x_t, t, {"tokens": jnp.asarray(first["tokens"])})
  direct = vlb.bits_per_dim(predict, run.autoencoder.encode(state.params, jnp.asarray(first["image"])), run.schedule,
                            jax.random.fold_in(jax.random.PRNGKey(0), 0), prediction_type="eps",
                            model_variance="learned", num_timesteps=4)
  print("NLL bits/dim after 3 steps:", nll)
  assert nll["auto"] == nll["learned"] != nll["fixed_large"]
  np.testing.assert_allclose(nll["learned"], float(direct.mean()), rtol=1e-5)

  # A batch short of batch_size is padded by repeating its last example; the padding's values are dropped.
  n, pad = len(first["image"]), 3
  padded = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in first.items()}
  got = sample_quality.nll_bits_per_dim(loaded, num_timesteps=4, model_variance="learned", batch_size=n + pad)
  predict = lambda x_t, t: run.model.apply({"params": state.params}, x_t, t, {"tokens": jnp.asarray(padded["tokens"])})
  direct = vlb.bits_per_dim(predict, run.autoencoder.encode(state.params, jnp.asarray(padded["image"])), run.schedule,
                            jax.random.fold_in(jax.random.PRNGKey(0), 0), prediction_type="eps",
                            model_variance="learned", num_timesteps=4)
  assert got["nll_num_images"] == n
  np.testing.assert_allclose(got["nll_bits_per_dim"], float(direct[:n].mean()), rtol=1e-5)
  assert abs(float(direct[n:].mean()) - float(direct[:n].mean())) > 1e-4  # The padding would have shifted it.


def test_nll_variance_resolution():
  c = tiny_config()
  assert sample_quality.resolve_model_variance(c) == "fixed_large"
  assert sample_quality.resolve_model_variance(c, "fixed_small") == "fixed_small"
  with pytest.raises(UserError, match="'learned' needs a run trained with diffusion.learn_sigma=True"):
    sample_quality.resolve_model_variance(c, "learned")
  c.diffusion.learn_sigma = True
  assert sample_quality.resolve_model_variance(c) == "learned"
  assert sample_quality.resolve_model_variance(c, "fixed_large") == "fixed_large"
