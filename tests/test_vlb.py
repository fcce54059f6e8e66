"""The variational bound (bits/dim) against closed forms computed in float64 and by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax.diffusion import losses, schedules, vlb

LN2 = np.log(2.0)
CENTERS = np.arange(256) / 127.5 - 1.0  # uint8 values scaled to [-1, 1].
# One compilation per shape instead of dozens of eager-op compilations (keeps the file fast on CPU).
vlb_terms = jax.jit(vlb.vlb_terms, static_argnums=(5, 6, 7))
log_likelihood = jax.jit(vlb.discretized_gaussian_log_likelihood)


def _schedule(betas):
  """A NoiseSchedule from float64 β's, built the way `make_schedule` builds its own."""
  betas = np.asarray(betas, np.float64)
  return schedules.NoiseSchedule(jnp.asarray(betas, jnp.float32), jnp.asarray(np.cumprod(1 - betas), jnp.float32))


def _posterior_np(betas, t):
  """float64 DDPM eq. 7 at 0-based t: (coef of x_0, coef of x_t, β̃_t), with ᾱ_{−1} = 1."""
  betas = np.asarray(betas, np.float64)
  abar = np.cumprod(1 - betas)
  abar_prev = 1.0 if t == 0 else abar[t - 1]
  return (np.sqrt(abar_prev) * betas[t] / (1 - abar[t]), np.sqrt(1 - betas[t]) * (1 - abar_prev) / (1 - abar[t]),
          (1 - abar_prev) / (1 - abar[t]) * betas[t])


def _random_pixels(key, shape):
  """uint8-valued data in [-1, 1]."""
  return jnp.asarray(CENTERS, jnp.float32)[jax.random.randint(key, shape, 0, 256)]


# ---------- normal_kl ----------

def test_normal_kl_matches_hand_computed_values():
  # KL = log(σ2/σ1) + (σ1² + (μ1 − μ2)²)/(2σ2²) − ½.
  # N(1, 1) ‖ N(0, 4): log 2 + (1 + 1)/8 − ½ = log 2 − ¼.
  np.testing.assert_allclose(vlb.normal_kl(1.0, 0.0, 0.0, np.log(4.0)), np.log(2) - 0.25, rtol=1e-6)
  # N(½, ¼) ‖ N(−1, 1): log 2 + (¼ + 9/4)/2 − ½ = log 2 + ¾.
  np.testing.assert_allclose(vlb.normal_kl(0.5, np.log(0.25), -1.0, 0.0), np.log(2) + 0.75, rtol=1e-6)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  mean, logvar = jax.random.normal(k1, (100,)), jax.random.normal(k2, (100,))
  np.testing.assert_allclose(vlb.normal_kl(mean, logvar, mean, logvar), 0.0, atol=1e-7)
  assert bool(jnp.all(vlb.normal_kl(mean, logvar, 0.3 * mean, 0.5 * logvar) >= 0))


# ---------- the discretized Gaussian decoder ----------

@pytest.mark.parametrize("mean, scale", [(0.0, 1.0), (0.3, 0.05), (1.7, 0.5), (-3.0, 2.0), (0.1, 1e-4),
                                         (1 / 255, 1e-3), (0.0, 30.0)])
def test_decoder_probabilities_sum_to_one(mean, scale):
  """Including a mean outside [-1, 1], a tiny scale, and a mean on a bin edge (mass split ½/½)."""
  log_p = log_likelihood(jnp.asarray(CENTERS, jnp.float32), mean, jnp.log(scale))
  assert bool(jnp.all(jnp.isfinite(log_p)))
  np.testing.assert_allclose(float(jnp.exp(log_p).sum()), 1.0, atol=1e-5)


def test_decoder_bin_masses_match_scipy():
  mean, scale = 0.1, 0.2
  log_scale = np.log(scale)
  for k in (0, 100, 140, 255):
    x = CENTERS[k]
    lo = -np.inf if k == 0 else x - 1 / 255
    hi = np.inf if k == 255 else x + 1 / 255
    want = stats.norm.cdf(hi, mean, scale) - stats.norm.cdf(lo, mean, scale)
    got = log_likelihood(jnp.float32(x), mean, log_scale)
    np.testing.assert_allclose(np.exp(float(got)), want, rtol=1e-5)


def test_decoder_is_accurate_far_in_the_tail():
  """50 standard deviations out, where Φ(hi) − Φ(lo) underflows even in float64."""
  x, mean, scale = CENTERS[191], 0.0, 0.01
  lo, hi = (x - 1 / 255) / scale, (x + 1 / 255) / scale
  want = stats.norm.logsf(lo) + np.log1p(-np.exp(stats.norm.logsf(hi) - stats.norm.logsf(lo)))
  got = log_likelihood(jnp.float32(x), mean, np.log(scale))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert want < -1000
  # Far below the first bin's upper edge the first bin holds all the mass; far above it, log Φ ≈ −z²/2.
  np.testing.assert_allclose(log_likelihood(jnp.float32(-1.0), -1.5, np.log(0.01)), 0.0,
                             atol=1e-6)
  z = (-1.0 + 1 / 255 - 0.5) / 0.01
  np.testing.assert_allclose(log_likelihood(jnp.float32(-1.0), 0.5, np.log(0.01)),
                             stats.norm.logcdf(z), rtol=1e-5)


def test_decoder_gradients_are_finite_at_the_edges():
  g = jax.jit(jax.grad(lambda m: log_likelihood(jnp.asarray(CENTERS[[0, 5, 255]]), m, jnp.log(0.01)).sum()))(0.9)
  assert np.isfinite(float(g))


# ---------- q(x_{t−1} | x_t, x_0) ----------

def test_q_posterior_matches_ddpm_eq7():
  betas = schedules.linear_betas(1000)
  s = _schedule(betas)
  x0 = jnp.array([0.7, -0.2, 1.0])
  x_t = jnp.array([0.1, 1.3, -2.0])
  for t in (0, 1, 2, 10, 500, 999):
    mean, var, log_var = vlb.q_posterior_mean_variance(s, x0, x_t, jnp.full((3,), t, jnp.int32))
    c0, ct, v = _posterior_np(betas, t)
    np.testing.assert_allclose(mean, c0 * np.asarray(x0) + ct * np.asarray(x_t), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(var, np.full(3, v), rtol=1e-4)
    # At t = 0 the posterior is a point mass on x_0; its log variance is clipped to log β̃_1.
    np.testing.assert_allclose(log_var, np.full(3, np.log(v if t else _posterior_np(betas, 1)[2])), atol=1e-4)


@pytest.mark.parametrize("t", [1, 30, 90])
def test_q_posterior_is_the_conditional_of_the_forward_chain(t):
  """Simulate x_{t−1} ~ q(x_{t−1} | x_0), x_t ~ N(√α_t·x_{t−1}, β_t) and regress x_{t−1} on x_t.

  For jointly Gaussian variables E[x_{t−1} | x_t] = a + b·x_t with b = cov/var and the residual
  variance is the conditional variance. Standard errors at n = 400k: ~0.2% relative.
  """
  s = schedules.make_schedule("cosine", 100)
  betas, abar = np.asarray(s.betas, np.float64), np.asarray(s.alphas_cumprod, np.float64)
  x0, n = 0.4, 400_000
  rng = np.random.default_rng(t)
  x_prev = np.sqrt(abar[t - 1]) * x0 + np.sqrt(1 - abar[t - 1]) * rng.standard_normal(n)
  x_t = np.sqrt(1 - betas[t]) * x_prev + np.sqrt(betas[t]) * rng.standard_normal(n)
  slope = np.cov(x_prev, x_t)[0, 1] / x_t.var(ddof=1)
  intercept = x_prev.mean() - slope * x_t.mean()
  residual_var = (x_prev - intercept - slope * x_t).var()

  tt = jnp.full((2,), t, jnp.int32)
  mean, var, _ = vlb.q_posterior_mean_variance(s, jnp.full((2,), x0), jnp.array([0.0, 1.0]), tt)
  np.testing.assert_allclose(slope, mean[1] - mean[0], rtol=1e-2)
  np.testing.assert_allclose(intercept, mean[0], atol=5e-3)
  np.testing.assert_allclose(residual_var, var[0], rtol=1e-2)


# ---------- the terms of the bound ----------

@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction_type", losses.PREDICTION_TYPES)
def test_oracle_terms(name, prediction_type):
  """The model that outputs the true target: L_t = 0 for fixed_small, closed forms otherwise."""
  s = schedules.make_schedule(name, 1000)
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  t = jnp.array([0, 1, 2, 10, 100, 500, 999], jnp.int32)
  x0 = _random_pixels(k1, (7, 4, 4, 1))
  noise = jax.random.normal(k2, x0.shape)
  abar = s.alphas_cumprod[t]
  x_t = losses.q_sample(x0, abar, noise)
  oracle = losses.prediction_target(prediction_type, x0, noise, abar)

  small = vlb_terms(oracle, x0, x_t, t, s, prediction_type, "fixed_small")
  np.testing.assert_allclose(small[1:], 0.0, atol=1e-5)
  # L_0: the decoder's mean is x_0 itself and its scale √β̃_1, so each pixel gets −log(2Φ(h/σ) − 1)
  # (interior) or −log Φ(h/σ) (first and last bin), h = 1/255.
  betas = np.asarray(s.betas, np.float64)
  sigma = np.sqrt(_posterior_np(betas, 1)[2])
  px = np.asarray(x0[0])
  h = 1 / 255 / sigma
  nll = np.where(np.abs(px) > 0.999, -stats.norm.logcdf(h), -np.log(2 * stats.norm.cdf(h) - 1))
  np.testing.assert_allclose(small[0], nll.mean() / LN2, rtol=1e-4)

  if prediction_type != "eps":
    return  # The variance does not depend on the parameterization; one compilation fewer.
  # fixed_large, same mean: KL(N(μ, β̃_t) ‖ N(μ, β_t)) = ½(log(β_t/β̃_t) + β̃_t/β_t − 1).
  large = vlb_terms(oracle, x0, x_t, t, s, prediction_type, "fixed_large")
  for i, ti in enumerate(np.asarray(t)[1:], start=1):
    ratio = _posterior_np(betas, ti)[2] / betas[ti]
    np.testing.assert_allclose(large[i], 0.5 * (-np.log(ratio) + ratio - 1) / LN2, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(large[0], small[0], rtol=1e-6)  # Both decoders use β̃_1.


def test_eps_error_costs_ddpm_eq12():
  """An ε off by δ moves the mean by β_t/(√α_t·√(1−ᾱ_t))·δ (eq. 11), so L_t = that²/(2β̃_t) nats (eq. 12)."""
  s = schedules.make_schedule("linear", 1000)
  betas = np.asarray(s.betas, np.float64)
  t = jnp.array([1, 2, 10, 50, 300, 500, 999], jnp.int32)
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  x0 = _random_pixels(k1, (7, 4, 4, 1))  # The shapes of test_oracle_terms: no new compilation.
  noise = jax.random.normal(k2, x0.shape)
  x_t = losses.q_sample(x0, s.alphas_cumprod[t], noise)
  delta = 0.5  # Large enough that float32 cancellation in μ̃ − μ_θ stays < 1e-4 relative.
  got = vlb_terms(noise + delta, x0, x_t, t, s, "eps", "fixed_small")
  abar = np.cumprod(1 - betas)
  for i, ti in enumerate(np.asarray(t)):
    shift = betas[ti] / np.sqrt((1 - betas[ti]) * (1 - abar[ti])) * delta
    np.testing.assert_allclose(got[i], shift**2 / (2 * _posterior_np(betas, ti)[2]) / LN2, rtol=1e-3)


def test_invalid_model_variance_is_an_error():
  s = schedules.make_schedule("cosine", 10)
  x = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match="model_variance='learned'"):
    vlb_terms(x, x, x, jnp.zeros((1,), jnp.int32), s, "eps", "learned")


# ---------- L_T ----------

def test_prior_bpd():
  x0 = jnp.array([[1.0, -1.0, 0.0, 0.5]])
  for name in ("linear", "cosine"):  # ᾱ_T ≈ 4e-5 and ≈ 0: x_T is pure noise.
    assert 0.0 <= float(vlb.prior_bpd(x0, schedules.make_schedule(name, 1000))[0]) < 1e-4
  # β = (0.1, 0.2, 0.3): ᾱ_T = 0.9·0.8·0.7 = 0.504; KL(N(√ᾱ·x, 1 − ᾱ) ‖ N(0, 1)) per pixel.
  abar = 0.504
  kl = 0.5 * (abar * np.asarray(x0[0]) ** 2 + (1 - abar) - 1 - np.log(1 - abar))
  np.testing.assert_allclose(vlb.prior_bpd(x0, _schedule([0.1, 0.2, 0.3]))[0], kl.mean() / LN2, rtol=1e-5)


# ---------- the whole bound ----------

def test_full_bound_equals_the_sum_of_its_terms():
  """The scan equals prior + Σ_t vlb_terms evaluated in a Python loop with the documented noise."""
  s = schedules.make_schedule("cosine", 10)
  x0 = _random_pixels(jax.random.PRNGKey(3), (4, 3, 3, 1))
  predict = lambda x_t, t: jnp.tanh(x_t) * (1.0 + 0.1 * t[:, None, None, None])  # Deterministic, t-dependent.
  rng = jax.random.PRNGKey(4)
  got = jax.jit(lambda x, r: vlb.bits_per_dim(predict, x, s, r, prediction_type="v",
                                              model_variance="fixed_large"))(x0, rng)
  want = vlb.prior_bpd(x0, s)
  for t, key in enumerate(jax.random.split(rng, 10)):
    tb = jnp.full((4,), t, jnp.int32)
    x_t = losses.q_sample(x0, s.alphas_cumprod[tb], jax.random.normal(key, x0.shape))
    want = want + vlb_terms(predict(x_t, tb), x0, x_t, tb, s, "v", "fixed_large")
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bound_in_closed_form_and_its_subsampled_estimate():
  """A model whose ε is off by a known δ_t: every term is then independent of the noise.

  It knows x_0 (a closure constant), so ε̂ = (x_t − √ᾱ_t·x_0)/√(1 − ᾱ_t) + δ_t: L_t for t ≥ 1 is eq. 12,
  L_0 the bin mass around x_0 under N(x_0 − √(1−ᾱ_0)/√ᾱ_0·δ_0, β̃_1). The K-of-T estimate's only randomness
  is then the choice of timesteps, whose spread is known exactly (sampling without replacement):
  its spread must match that, and its mean over M draws be within 4 standard errors of the full bound.
  """
  betas = np.linspace(1e-3, 0.4, 12)
  T, K, M = len(betas), 3, 500
  s = _schedule(betas)
  abar = np.cumprod(1 - betas)
  x0 = _random_pixels(jax.random.PRNGKey(5), (2, 3, 3, 1))
  deltas = 0.3 * np.cos(np.arange(T))

  def predict(x_t, t):
    a = losses._bcast(s.alphas_cumprod[t], x_t)
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a) + losses._bcast(jnp.asarray(deltas, jnp.float32)[t], x_t)

  # Ground truth in float64, per example.
  px = np.asarray(x0, np.float64).reshape(2, -1)
  terms = np.zeros((2, T))
  for t in range(1, T):
    shift = betas[t] / np.sqrt((1 - betas[t]) * (1 - abar[t])) * deltas[t]
    terms[:, t] = shift**2 / (2 * _posterior_np(betas, t)[2]) / LN2
  mean0 = px - np.sqrt(1 - abar[0]) / np.sqrt(abar[0]) * deltas[0]
  sigma = np.sqrt(_posterior_np(betas, 1)[2])
  hi = np.where(px > 0.999, np.inf, px + 1 / 255)
  lo = np.where(px < -0.999, -np.inf, px - 1 / 255)
  mass = stats.norm.cdf(hi, mean0, sigma) - stats.norm.cdf(lo, mean0, sigma)
  terms[:, 0] = -np.log(mass).mean(axis=1) / LN2
  prior = (0.5 * (abar[-1] * px**2 + (1 - abar[-1]) - 1 - np.log(1 - abar[-1]))).mean(axis=1) / LN2
  full = prior + terms.sum(axis=1)

  bpd = lambda r, k: vlb.bits_per_dim(predict, x0, s, r, prediction_type="eps", model_variance="fixed_small",
                                      num_timesteps=k)
  np.testing.assert_allclose(jax.jit(lambda r: bpd(r, None))(jax.random.PRNGKey(6)), full, rtol=1e-4)

  estimates = np.asarray(jax.jit(jax.vmap(lambda r: bpd(r, K)))(jax.random.split(jax.random.PRNGKey(7), M)))
  assert estimates.std(axis=0).min() > 0.1  # The choice of t really is random.
  # Var[(T/K)·Σ_k L_{t_k}] = T²·(1 − K/T)·S²/K, S² the terms' variance with T − 1 in the denominator.
  spread = T * np.sqrt((1 - K / T) * terms.var(axis=1, ddof=1) / K)
  np.testing.assert_allclose(estimates.std(axis=0), spread, rtol=0.15)  # ~3% sampling error at M = 500.
  assert np.all(np.abs(estimates.mean(axis=0) - full) < 4 * spread / np.sqrt(M)), (estimates.mean(axis=0), full)


def test_exact_denoiser_beats_the_ignorant_model_and_respects_the_entropy():
  """Gaussian data quantized to uint8: the exact E[ε | x_t] against ε̂ = 0.

  The bound is ≥ −log p_model(x_0), whose expectation is ≥ the data's entropy H, so the mean of
  bpd − (−log2 p_data(x_0)) over samples must not be significantly negative (3 standard errors).
  """
  mu, std, n = 0.1, 0.3, 256
  s = schedules.make_schedule("cosine", 100)
  k = np.round((np.clip(mu + std * np.asarray(jax.random.normal(jax.random.PRNGKey(8), (n, 2, 2, 1))), -1, 1)
                + 1) * 127.5).astype(int)
  x0 = jnp.asarray(CENTERS[k], jnp.float32)
  edges = np.concatenate([[-np.inf], CENTERS[:-1] + 1 / 255, [np.inf]])
  p_data = np.diff(stats.norm.cdf(edges, mu, std))
  data_nll = -np.log2(p_data[k]).reshape(n, -1).mean(axis=1)

  def exact_eps(x_t, t):  # E[ε | x_t] when x_0 ~ N(μ, σ²).
    a = losses._bcast(s.alphas_cumprod[t], x_t)
    return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * std**2 + 1 - a)

  bpd = lambda f: jax.jit(lambda x, r: vlb.bits_per_dim(f, x, s, r, prediction_type="eps",
                                                        model_variance="fixed_large"))(x0, jax.random.PRNGKey(9))
  exact = np.asarray(bpd(exact_eps))
  ignorant = np.asarray(bpd(lambda x_t, t: jnp.zeros_like(x_t)))
  gap = exact - data_nll
  assert gap.mean() > -3 * gap.std() / np.sqrt(n), gap.mean()
  assert exact.mean() < (p_data * -np.log2(p_data)).sum() + 0.5  # H ≈ 7.30 bits; the bound is ≈ 7.5.
  assert ignorant.mean() > exact.mean() + 100
