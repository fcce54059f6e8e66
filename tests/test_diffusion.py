"""The diffusion math against closed forms and an exact (analytic) denoiser."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

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


def test_scaled_linear_schedule_matches_stable_diffusion():
  s = schedules.make_schedule("scaled_linear", 1000)
  np.testing.assert_allclose([s.betas[0], s.betas[-1]], [0.00085, 0.012], rtol=1e-6)
  np.testing.assert_allclose(np.sqrt(s.betas[500]), np.linspace(0.00085**0.5, 0.012**0.5, 1000)[500], rtol=1e-6)
  # ᾱ_999 of SD's schedule is ≈ 0.0047 (SNR ≈ 0.0047 at the last step, not 0: why Lin et al. rescale it).
  np.testing.assert_allclose(s.alphas_cumprod[-1], 0.0047, rtol=0.02)


def test_linear_schedule_scales_with_T():
  s = schedules.make_schedule("linear", 4000)
  np.testing.assert_allclose([s.betas[0], s.betas[-1]], [2.5e-5, 0.005], rtol=1e-6)
  assert float(s.alphas_cumprod[-1]) < 1e-4


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(name):
  plain = schedules.make_schedule(name, 1000)
  zero = schedules.make_schedule(name, 1000, zero_terminal_snr=True)
  assert float(zero.alphas_cumprod[-1]) == 0.0
  np.testing.assert_allclose(zero.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-6)
  assert np.all(np.diff(np.asarray(zero.alphas_cumprod)) <= 0)
  # √ᾱ is an affine map of the original √ᾱ (Algorithm 1): check at an interior step.
  sa, sz = np.sqrt(np.asarray(plain.alphas_cumprod, np.float64)), np.sqrt(np.asarray(zero.alphas_cumprod, np.float64))
  expected = (sa[500] - sa[-1]) * sa[0] / (sa[0] - sa[-1])
  np.testing.assert_allclose(sz[500], expected, rtol=1e-5)


def test_snr_helpers():
  abar = jnp.array([0.5, 0.8, 0.2])
  np.testing.assert_allclose(schedules.snr(abar), [1.0, 4.0, 0.25], rtol=1e-6)
  np.testing.assert_allclose(schedules.log_snr(abar), np.log([1.0, 4.0, 0.25]), atol=1e-6)
  np.testing.assert_allclose(schedules.alpha(abar) ** 2 + schedules.sigma(abar) ** 2, 1.0, rtol=1e-6)


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


def test_min_snr_weights_closed_form():
  abar = jnp.array([0.99, 0.5, 0.01])  # SNR = 99, 1, 1/99.
  snr = np.array([99.0, 1.0, 1 / 99])
  clipped = np.minimum(snr, 5.0)
  np.testing.assert_allclose(losses.loss_weight("min_snr", "eps", abar), clipped / snr, rtol=1e-4)
  np.testing.assert_allclose(losses.loss_weight("min_snr", "v", abar), clipped / (snr + 1), rtol=1e-4)
  np.testing.assert_allclose(losses.loss_weight("min_snr", "x0", abar), clipped, rtol=1e-4)
  np.testing.assert_array_equal(losses.loss_weight("uniform", "v", abar), np.ones(3))


def test_min_snr_is_one_objective_in_every_parameterization():
  """The same prediction error, expressed as ε, v or x0 output, gets the same min-SNR-weighted loss."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  x0 = jax.random.uniform(k1, (6, 4, 4, 1), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  abar = jnp.array([0.999, 0.9, 0.5, 0.2, 0.05, 0.001])
  x_t = losses.q_sample(x0, abar, eps)
  x0_hat = x0 + 0.1 * jax.random.normal(k3, x0.shape)  # A model's (wrong) estimate of x0.
  per_type = []
  for p in losses.PREDICTION_TYPES:
    a = abar[:, None, None, None]
    eps_hat = (x_t - jnp.sqrt(a) * x0_hat) / jnp.sqrt(1 - a)  # The same estimate, as ε.
    output = losses.prediction_target(p, x0_hat, eps_hat, abar)
    target = losses.prediction_target(p, x0, eps, abar)
    mse = jnp.mean((output - target) ** 2, axis=(1, 2, 3))
    per_type.append(np.asarray(losses.loss_weight("min_snr", p, abar) * mse))
  np.testing.assert_allclose(per_type[0], per_type[1], rtol=2e-3)
  np.testing.assert_allclose(per_type[0], per_type[2], rtol=2e-3)


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


MIX_WEIGHTS, MIX_MEANS, MIX_STDS = np.array([0.3, 0.7]), np.array([-0.5, 0.4]), np.array([0.1, 0.2])


def mixture_eps(x_t, t, cond, schedule):
  """E[ε | x_t] = −σ_t·∇log p_t(x_t) for x_0 from the 1-D mixture Σ w_k N(μ_k, s_k²):
  p_t = Σ w_k N(√ᾱ μ_k, ᾱ s_k² + 1 − ᾱ)."""
  del cond
  a = schedule.alphas_cumprod[t].reshape(-1, *([1] * (x_t.ndim - 1)))[..., None]
  var = a * MIX_STDS**2 + 1 - a
  resid = x_t[..., None] - jnp.sqrt(a) * MIX_MEANS
  log_w = jnp.log(MIX_WEIGHTS) - 0.5 * jnp.log(var) - 0.5 * resid**2 / var
  resp = jax.nn.softmax(log_w, axis=-1)
  score = jnp.sum(resp * (-resid / var), axis=-1)
  return -jnp.sqrt(1 - a[..., 0]) * score


def mixture_reference(n, seed=0):
  rng = np.random.default_rng(seed)
  k = rng.choice(2, size=n, p=MIX_WEIGHTS)
  return rng.normal(MIX_MEANS[k], MIX_STDS[k])


SCHEDULE = schedules.make_schedule("cosine", 1000)
STD = 0.3


def _run(denoise, options, cond, uncond, scale, n, seed=0):
  x_T = jax.random.normal(jax.random.PRNGKey(seed), (n, 1, 1, 1))
  return samplers.sample(denoise, SCHEDULE, x_T, cond, uncond, jnp.full((n,), scale),
                         jax.random.PRNGKey(seed + 1), options)


def _gaussian_samples(mean_c, mean_u, scale, options, n=4000, seed=0):
  denoise = lambda x, t, cond: gaussian_eps(x, t, cond, SCHEDULE, STD)
  return np.asarray(_run(denoise, options, {"mean": jnp.full((n,), mean_c)}, {"mean": jnp.full((n,), mean_u)},
                         scale, n, seed)).ravel()


# (options, Wasserstein-1 tolerance on the mixture). Realistic step counts for each sampler; the
# tolerance is ~3× the W1 between two independent 4000-sample draws of the mixture (≈0.01) plus the
# sampler's discretization error measured once (DDPM with 100 steps is the coarsest).
SAMPLER_CASES = [
    (samplers.SamplerOptions("ddim", 50, x0_clipping="none"), 0.03),
    (samplers.SamplerOptions("ddim", 100, eta=1.0, x0_clipping="none"), 0.03),
    (samplers.SamplerOptions("ddpm", 250, ddpm_variance="small", x0_clipping="none"), 0.03),
    (samplers.SamplerOptions("ddpm", 250, ddpm_variance="large", x0_clipping="none"), 0.04),
    (samplers.SamplerOptions("dpm_solver_pp_2m", 20, x0_clipping="none"), 0.03),
    (samplers.SamplerOptions("dpm_solver_pp_2m", 25, spacing="trailing", x0_clipping="none"), 0.03),
]


@pytest.mark.parametrize("options,tolerance", SAMPLER_CASES, ids=lambda o: getattr(o, "sampler", ""))
def test_samplers_reproduce_a_gaussian_mixture(options, tolerance):
  n = 4000
  x = np.asarray(_run(lambda x, t, c: mixture_eps(x, t, c, SCHEDULE), options, {"m": jnp.zeros(n)},
                      {"m": jnp.zeros(n)}, 1.0, n)).ravel()
  w1 = scipy.stats.wasserstein_distance(x, mixture_reference(100_000))
  assert w1 < tolerance, (options, w1)
  # The mode weights, which a sampler that only gets the mean and variance right would miss.
  assert abs(np.mean(x < 0) - MIX_WEIGHTS[0]) < 0.03


@pytest.mark.parametrize("options", [o for o, _ in SAMPLER_CASES], ids=lambda o: o.sampler)
def test_samplers_reproduce_the_gaussian_moments(options):
  x = _gaussian_samples(0.2, 0.2, 1.0, options)
  # Standard errors with n = 4000: mean 0.3/√4000 ≈ 0.005, std ≈ 0.0034.
  assert abs(x.mean() - 0.2) < 0.02
  assert abs(x.std() - STD) < 0.02


@pytest.mark.parametrize("sampler,steps", [("ddim", 50), ("ddpm", 250), ("dpm_solver_pp_2m", 20)])
def test_guidance_moves_the_mean_by_the_expected_amount(sampler, steps):
  """For Gaussians of equal variance, u + s(c − u) is the exact ε of N(μ_u + s(μ_c − μ_u), σ²)."""
  options = samplers.SamplerOptions(sampler, steps, x0_clipping="none")
  for scale in (0.0, 1.0, 3.0):
    x = _gaussian_samples(0.2, -0.1, scale, options)
    assert abs(x.mean() - (-0.1 + scale * 0.3)) < 0.02, scale
    assert abs(x.std() - STD) < 0.02


def test_per_sample_guidance_scales_in_one_call():
  n = 3000
  denoise = lambda x, t, cond: gaussian_eps(x, t, cond, SCHEDULE, STD)
  scales = jnp.repeat(jnp.array([0.0, 1.0, 2.0]), n // 3)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (n, 1, 1, 1))
  x = samplers.sample(denoise, SCHEDULE, x_T, {"mean": jnp.full((n,), 0.2)}, {"mean": jnp.full((n,), -0.1)},
                      scales, jax.random.PRNGKey(1), samplers.SamplerOptions(x0_clipping="none"))
  means = np.asarray(x).reshape(3, -1).mean(axis=1)
  np.testing.assert_allclose(means, [-0.1, 0.2, 0.5], atol=0.02)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_guidance_scale_one_ignores_the_unconditional_branch_exactly(sampler):
  options = samplers.SamplerOptions(sampler, 20)
  guided = _gaussian_samples(0.2, -0.5, 1.0, options, n=64)
  other = _gaussian_samples(0.2, 5.0, 1.0, options, n=64)  # Another unconditional model entirely.
  np.testing.assert_array_equal(guided, other)


def test_guidance_interval():
  full = samplers.SamplerOptions("ddim", 20, x0_clipping="none")
  # An interval that holds no visited timestep is plain conditional sampling, exactly.
  never = dataclasses.replace(full, guidance_interval=(0.5, 0.52))
  assert not any(0.5 * 1000 <= t <= 0.52 * 1000 for t in samplers.timesteps("linspace", 1000, 20))
  np.testing.assert_array_equal(_gaussian_samples(0.2, -0.1, 3.0, never, n=64),
                                _gaussian_samples(0.2, -0.1, 1.0, full, n=64))
  # Guidance on only part of the trajectory moves the mean part of the way.
  half = dataclasses.replace(full, guidance_interval=(0.0, 0.5))
  mean_half = _gaussian_samples(0.2, -0.1, 3.0, half).mean()
  assert 0.25 < mean_half < 0.75


def test_guidance_rescale_matches_the_conditional_std():
  c = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 5, 1))
  u = 0.3 * jax.random.normal(jax.random.PRNGKey(1), (4, 5, 5, 1))
  denoise = lambda x, t, cond: jnp.where(cond["is_c"].reshape(-1, 1, 1, 1), c_both, u_both)
  c_both, u_both = jnp.concatenate([c, c]), jnp.concatenate([u, u])
  cond, uncond = {"is_c": jnp.ones(4, bool)}, {"is_c": jnp.zeros(4, bool)}
  x, t, s = jnp.zeros_like(c), jnp.zeros(4, jnp.int32), jnp.full((4,), 5.0)
  plain = samplers.guided_output(denoise, x, t, cond, uncond, s)
  np.testing.assert_allclose(plain, u + 5.0 * (c - u), rtol=1e-5, atol=1e-5)
  full = samplers.guided_output(denoise, x, t, cond, uncond, s, guidance_rescale=1.0)
  std = lambda a: np.std(np.asarray(a).reshape(4, -1), axis=1)
  np.testing.assert_allclose(std(full), std(c), rtol=1e-5)  # φ = 1: std equals that of the cond. output.
  part = samplers.guided_output(denoise, x, t, cond, uncond, s, guidance_rescale=0.7)
  np.testing.assert_allclose(part, 0.7 * full + 0.3 * plain, rtol=1e-4, atol=1e-5)


def test_dynamic_threshold():
  x0 = jnp.stack([jnp.linspace(-3.0, 3.0, 1001), jnp.linspace(-0.5, 0.5, 1001)]).reshape(2, 1001, 1, 1)
  out = np.asarray(samplers.dynamic_threshold(x0, 0.995)).reshape(2, -1)
  s = np.quantile(np.abs(np.linspace(-3.0, 3.0, 1001)), 0.995)  # ≈ 2.985
  np.testing.assert_allclose(out[0], np.clip(np.linspace(-3.0, 3.0, 1001), -s, s) / s, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[1], np.asarray(x0[1]).ravel())  # s = max(s, 1) = 1: unchanged.
  assert np.abs(out).max() <= 1.0


def test_timestep_spacings_match_the_published_tables():
  # Lin et al. 2023 (Table 2) / diffusers: T = 1000, 10 steps.
  np.testing.assert_array_equal(samplers.timesteps("linspace", 1000, 10),
                                [999, 888, 777, 666, 555, 444, 333, 222, 111, 0])
  np.testing.assert_array_equal(samplers.timesteps("leading", 1000, 10),
                                [900, 800, 700, 600, 500, 400, 300, 200, 100, 0])
  np.testing.assert_array_equal(samplers.timesteps("trailing", 1000, 10),
                                [999, 899, 799, 699, 599, 499, 399, 299, 199, 99])


def test_ddim_eta0_is_deterministic_and_inverts():
  """η = 0 DDIM is an ODE solver: running it backwards (encode) then forwards (decode) recovers x_0."""
  x0 = jnp.linspace(-0.6, 0.6, 16).reshape(16, 1, 1, 1)
  steps = 200
  ts = samplers.timesteps("linspace", 1000, steps)[::-1]
  abar = SCHEDULE.alphas_cumprod
  cond = {"mean": jnp.full((16,), 0.1)}
  eps_fn = lambda x, t: gaussian_eps(x, jnp.full((16,), t), cond, SCHEDULE, STD)
  x, a_cur, t_cur = x0, 1.0, ts[0]
  for t_next in ts:  # DDIM run backwards: ε at the current point, then the step to the next ᾱ.
    eps = eps_fn(x, t_cur)
    x0_hat = (x - jnp.sqrt(1 - a_cur) * eps) / jnp.sqrt(a_cur)
    a_cur, t_cur = abar[t_next], t_next
    x = jnp.sqrt(a_cur) * x0_hat + jnp.sqrt(1 - a_cur) * eps
  assert float(jnp.std(x)) > 0.5  # Encoded to (nearly) noise, not left near the data.
  denoise = lambda x, t, c: gaussian_eps(x, t, c, SCHEDULE, STD)
  options = samplers.SamplerOptions("ddim", steps, x0_clipping="none")
  decode = lambda key: samplers.sample(denoise, SCHEDULE, x, cond, cond, jnp.ones((16,)), key, options)
  decoded = decode(jax.random.PRNGKey(0))
  np.testing.assert_allclose(decoded, x0, atol=2e-2)
  np.testing.assert_array_equal(np.asarray(decoded), np.asarray(decode(jax.random.PRNGKey(9))))


def test_zero_terminal_snr_with_v_prediction_samples_the_data():
  """With ᾱ_{T−1} = 0 the first step sees pure noise; v-prediction keeps every step finite."""
  zs = schedules.make_schedule("scaled_linear", 1000, zero_terminal_snr=True)
  n = 4000

  def v_denoise(x, t, cond):
    a = zs.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    eps = gaussian_eps(x, t, cond, zs, STD)
    x0 = jnp.where(a > 0, (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(jnp.maximum(a, 1e-20)), cond["mean"].reshape(-1, 1, 1, 1))
    return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

  # Measured std at 200 steps: DDIM 0.291, DDPM 0.275, DPM-Solver++ 0.297 (→ 0.300 as steps grow:
  # discretization error next to SNR = 0, largest for DDPM's fixed small variance, which under-disperses).
  for sampler in samplers.SAMPLERS:
    options = samplers.SamplerOptions(sampler, 200, spacing="trailing", prediction_type="v", x0_clipping="none")
    x_T = jax.random.normal(jax.random.PRNGKey(0), (n, 1, 1, 1))
    cond = {"mean": jnp.full((n,), 0.2)}
    x = np.asarray(samplers.sample(v_denoise, zs, x_T, cond, cond, jnp.ones(n), jax.random.PRNGKey(1), options))
    assert np.isfinite(x).all(), sampler
    assert abs(x.mean() - 0.2) < 0.02 and abs(x.std() - STD) < 0.035, (sampler, x.mean(), x.std())


def test_sampler_is_traced_once_for_repeated_calls():
  traces = []

  def denoise(x, t, cond):
    traces.append(1)
    return gaussian_eps(x, t, cond, SCHEDULE, STD)

  options = samplers.SamplerOptions("dpm_solver_pp_2m", 10)
  fn = jax.jit(lambda x, c, u, s, k: samplers.sample(denoise, SCHEDULE, x, c, u, s, k, options))
  args = lambda seed: (jax.random.normal(jax.random.PRNGKey(seed), (8, 2, 2, 1)), {"mean": jnp.zeros(8)},
                       {"mean": jnp.ones(8)}, jnp.full((8,), 1.0 + seed), jax.random.PRNGKey(seed))
  fn(*args(0))
  n = len(traces)
  assert n >= 1
  fn(*args(1))  # New values (also a new guidance scale), same shapes: no new trace.
  assert len(traces) == n


@pytest.mark.parametrize("clipping, expected", [("static", 1.0), ("none", 5.0)])
def test_ddim_ends_on_the_clipped_x0_prediction(clipping, expected):
  """The last DDIM step goes to ᾱ_prev = 1, so the sample is exactly the (clipped) x̂0 prediction."""
  schedule = schedules.make_schedule("linear", 100)
  denoise = lambda x, t, cond: jnp.full_like(x, 5.0)  # An x0-predictor far outside [-1, 1].
  options = samplers.SamplerOptions(num_steps=5, prediction_type="x0", x0_clipping=clipping)
  out = samplers.sample(denoise, schedule, jnp.ones((2, 4, 4, 1)), {}, None, jnp.ones((2,)),
                        jax.random.PRNGKey(0), options)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)
