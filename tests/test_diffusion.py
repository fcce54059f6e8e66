"""The diffusion math against closed forms and an exact (analytic) denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import losses, samplers, schedules


# ---------- schedules ----------

def test_linear_schedule_endpoints():
  s = schedules.make_schedule("linear", 1000)
  np.testing.assert_allclose([s.betas[0], s.betas[-1]], [1e-4, 0.02], rtol=1e-6)
  # ᾱ_T of DDPM's schedule is ≈ 4.0358e-5 (so x_T is nearly pure noise).
  np.testing.assert_allclose(s.alphas_cumprod[-1], np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-4)
  assert 3e-5 < float(s.alphas_cumprod[-1]) < 5e-5


def test_cosine_schedule_matches_closed_form():
  T, s_off = 1000, 0.008
  s = schedules.make_schedule("cosine", T)
  f = lambda t: np.cos((t / T + s_off) / (1 + s_off) * np.pi / 2) ** 2
  for t in (0, 100, 500, 900):  # Where no β is clipped, ᾱ_t = f(t+1)/f(0) exactly.
    np.testing.assert_allclose(s.alphas_cumprod[t], f(t + 1) / f(0), rtol=1e-5)
  assert float(s.betas.max()) <= 0.999 + 1e-7
  assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


def test_unknown_schedule_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
    schedules.make_schedule("quadratic", 10)


# ---------- forward process and parameterizations ----------

def test_q_sample_moments_match_the_formula():
  abar = 0.3
  x0 = jnp.full((200_000,), 0.7)
  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  x_t = losses.q_sample(x0, jnp.full((200_000,), abar), noise)
  np.testing.assert_allclose(x_t.mean(), np.sqrt(abar) * 0.7, atol=5e-3)
  np.testing.assert_allclose(x_t.var(), 1 - abar, rtol=1e-2)


@pytest.mark.parametrize("prediction_type", losses.PREDICTION_TYPES)
def test_parameterizations_round_trip(prediction_type):
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.uniform(k1, (4, 3, 3, 1), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  abar = jnp.array([0.999, 0.5, 0.1, 0.01])
  x_t = losses.q_sample(x0, abar, eps)
  target = losses.prediction_target(prediction_type, x0, eps, abar)
  eps_hat, x0_hat = losses.to_eps_and_x0(prediction_type, target, x_t, abar)
  np.testing.assert_allclose(eps_hat, eps, atol=2e-4)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-4)


def test_loss_is_zero_for_the_true_noise():
  """With the oracle that knows ε, the eps-loss vanishes; any error shows up as its MSE."""
  s = schedules.make_schedule("cosine", 100)
  x0 = jnp.zeros((8, 2, 2, 1))  # x_t = √(1−ᾱ)·ε, so ε = x_t / √(1−ᾱ_t).
  oracle = lambda x_t, t: x_t / jnp.sqrt(1 - s.alphas_cumprod[t])[:, None, None, None]
  assert float(losses.diffusion_loss(oracle, x0, s, "eps", jax.random.PRNGKey(0))) < 1e-8
  off = lambda x_t, t: oracle(x_t, t) + 0.5
  np.testing.assert_allclose(losses.diffusion_loss(off, x0, s, "eps", jax.random.PRNGKey(0)), 0.25, rtol=1e-5)


# ---------- samplers with an exact denoiser ----------

def gaussian_eps(x_t, t, cond, schedule, std):
  """E[ε | x_t] when x_0 ~ N(cond['mean'], std²): √(1−ᾱ)(x_t − √ᾱ·μ) / (ᾱσ² + 1 − ᾱ)."""
  a = schedule.alphas_cumprod[t].reshape(-1, *([1] * (x_t.ndim - 1)))
  mu = cond["mean"].reshape(a.shape)
  return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * std**2 + 1 - a)


SCHEDULE = schedules.make_schedule("cosine", 1000)
STD = 0.3


def _sample(mean_c, mean_u, scale, *, n=4000, steps=100, eta=0.0, seed=0):
  denoise = lambda x, t, cond: gaussian_eps(x, t, cond, SCHEDULE, STD)
  x_T = jax.random.normal(jax.random.PRNGKey(seed), (n, 1, 1, 1))
  cond = {"mean": jnp.full((n,), mean_c)}
  uncond = {"mean": jnp.full((n,), mean_u)}
  return samplers.ddim_sample(denoise, SCHEDULE, x_T, cond, uncond, jnp.full((n,), scale),
                              jax.random.PRNGKey(seed + 1), num_steps=steps, eta=eta, clip_x0=False)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_reproduces_the_data_distribution(eta):
  x = np.asarray(_sample(0.2, 0.2, 1.0, eta=eta)).ravel()
  # Standard errors with n = 4000: mean 0.3/√4000 ≈ 0.005, std ≈ 0.0034.
  assert abs(x.mean() - 0.2) < 0.02
  assert abs(x.std() - STD) < 0.02


def test_guidance_moves_the_mean_by_the_expected_amount():
  """For Gaussians of equal variance, u + s(c − u) is the exact ε of N(μ_u + s(μ_c − μ_u), σ²)."""
  for scale in (0.0, 1.0, 2.0, 3.0):
    x = np.asarray(_sample(0.2, -0.1, scale)).ravel()
    assert abs(x.mean() - (-0.1 + scale * 0.3)) < 0.02, scale
    assert abs(x.std() - STD) < 0.02


def test_guidance_scale_one_equals_the_conditional_sampler_exactly():
  guided = _sample(0.2, -0.5, 1.0, n=64, steps=20)
  # The unconditional branch cannot leak in at s = 1: swap it for something else entirely.
  other = _sample(0.2, 5.0, 1.0, n=64, steps=20)
  np.testing.assert_array_equal(np.asarray(guided), np.asarray(other))


def test_ddim_eta0_is_deterministic_and_inverts():
  """η = 0 DDIM is an ODE solver: running it backwards (encode) then forwards (decode) recovers x_0."""
  x0 = jnp.linspace(-0.6, 0.6, 16).reshape(16, 1, 1, 1)
  steps = 200
  ts = samplers.linspace_timesteps(1000, steps)[::-1]
  abar = SCHEDULE.alphas_cumprod
  cond = {"mean": jnp.full((16,), 0.1)}
  eps_fn = lambda x, t: gaussian_eps(x, jnp.full((16,), t), cond, SCHEDULE, STD)
  x, a_cur, t_cur = x0, 1.0, ts[0]
  for t_next in ts:  # DDIM run backwards: ε at the current point, then the step to the next ᾱ.
    eps = eps_fn(x, t_cur)
    x0_hat = (x - jnp.sqrt(1 - a_cur) * eps) / jnp.sqrt(a_cur)
    a_cur, t_cur = abar[t_next], t_next
    x = jnp.sqrt(a_cur) * x0_hat + jnp.sqrt(1 - a_cur) * eps
  denoise = lambda x, t, c: gaussian_eps(x, t, c, SCHEDULE, STD)
  decoded = samplers.ddim_sample(denoise, SCHEDULE, x, cond, cond, jnp.ones((16,)), jax.random.PRNGKey(0),
                                 num_steps=steps, eta=0.0, clip_x0=False)
  np.testing.assert_allclose(decoded, x0, atol=2e-2)
  again = samplers.ddim_sample(denoise, SCHEDULE, x, cond, cond, jnp.ones((16,)), jax.random.PRNGKey(9),
                               num_steps=steps, eta=0.0, clip_x0=False)
  np.testing.assert_array_equal(np.asarray(decoded), np.asarray(again))  # The key does not matter at η = 0.


def test_sampler_is_traced_once_for_repeated_calls():
  traces = []

  def denoise(x, t, cond):
    traces.append(1)
    return gaussian_eps(x, t, cond, SCHEDULE, STD)

  fn = jax.jit(lambda x, c, u, s, k: samplers.ddim_sample(denoise, SCHEDULE, x, c, u, s, k, num_steps=10))
  args = lambda seed: (jax.random.normal(jax.random.PRNGKey(seed), (8, 2, 2, 1)), {"mean": jnp.zeros(8)},
                       {"mean": jnp.ones(8)}, jnp.full((8,), 1.0 + seed), jax.random.PRNGKey(seed))
  fn(*args(0))
  n = len(traces)
  assert n >= 1
  fn(*args(1))  # New values (also a new guidance scale), same shapes: no new trace.
  assert len(traces) == n
