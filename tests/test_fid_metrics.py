"""Sample-quality metrics on features (`metrics/fid.py`) against ground truth: closed forms, brute force, real data."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import numpy as np
import pytest

from diffusion_jax.errors import UserError
from diffusion_jax.metrics import fid


def _random_spd(rng, d, scale=1.0):
  a = rng.normal(size=(d, d))
  return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _sym_sqrt(s):
  """The symmetric PSD square root from an eigendecomposition."""
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _closed_form_fd(mu1, s1, mu2, s2):
  """‖μ1−μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}, all symmetric (no scipy.sqrtm)."""
  r1 = _sym_sqrt(s1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sym_sqrt(r1 @ s2 @ r1)))


# --- Fréchet distance ---------------------------------------------------------------------------


def test_fd_matches_closed_form_for_full_non_commuting_covariances():
  rng = np.random.default_rng(0)
  for d in (2, 5, 16):
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d, scale=2.0)
    assert not np.allclose(s1 @ s2, s2 @ s1)  # Non-commuting: tr sqrt(Σ1Σ2) ≠ tr Σ1^{1/2}Σ2^{1/2}.
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # No scipy deprecation or LinAlgWarning leaks out.
      got = fid.frechet_distance(mu1, s1, mu2, s2)
    want = _closed_form_fd(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-8)
    assert isinstance(got, float)


def test_fd_diagonal_case_by_hand():
  # Diagonal: FD = Σ (μ1−μ2)² + Σ (σ1 − σ2)² with σ the standard deviations.
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
  var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
  want = (1 + 0 + 4) + ((1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 3) ** 2)
  assert fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(want, rel=1e-12)
  # 1-D: (μ1−μ2)² + (σ1−σ2)².
  assert fid.frechet_distance([3.0], [[4.0]], [1.0], [[1.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)


def test_fd_of_a_distribution_with_itself_is_zero():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12))
  mu, sigma = x.mean(0), np.cov(x, rowvar=False)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fd_from_streamed_samples_converges_to_the_closed_form():
  rng = np.random.default_rng(2)
  d = 4
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  want = _closed_form_fd(mu1, s1, mu2, s2)
  l1, l2 = np.linalg.cholesky(s1), np.linalg.cholesky(s2)
  errors = []
  for n in (300, 3_000, 100_000):
    stats1, stats2 = fid.RunningStats(d), fid.RunningStats(d)
    for start in range(0, n, 7_000):
      b = min(7_000, n - start)
      stats1.update(mu1 + rng.normal(size=(b, d)) @ l1.T)
      stats2.update(mu2 + rng.normal(size=(b, d)) @ l2.T)
    assert stats1.count == n
    errors.append(abs(fid.frechet_distance(stats1.mean(), stats1.covariance(), stats2.mean(),
                                           stats2.covariance()) - want))
  assert errors[-1] < 0.01 * want
  assert errors[-1] < errors[0]


def test_fd_shape_mismatch_and_imaginary_and_singular_fallback(monkeypatch):
  with pytest.raises(UserError, match=r"mu1 \(3,\) and mu2 \(4,\)"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(UserError, match=r"sigma1 \(3, 3\) and sigma2 \(2, 2\)"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
  # A product with a negative eigenvalue has an imaginary square root: ValueError as in pytorch-fid.
  with pytest.raises(ValueError, match="imaginary component"):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  # Non-finite sqrt of the product → retried with eps·I added to both covariances.
  calls, real_sqrtm = [], fid.linalg.sqrtm

  def fake_sqrtm(a):
    calls.append(a.copy())
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(fid.linalg, "sqrtm", fake_sqrtm)
  s1, s2 = np.diag([1.0, 0.0]), np.diag([0.0, 1.0])
  got = fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-6)
  np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)))
  assert got == pytest.approx(2.0 - 4 * math.sqrt(1e-6 * (1 + 1e-6)), rel=1e-9)


def _digits_features():
  from diffusion_jax.data.builders import digits  # pylint: disable=g-import-not-at-top
  images, labels = digits.load_raw_digits()
  return images.reshape(len(images), -1).astype(np.float64) / 255.0, labels


def test_fd_of_real_digit_halves_is_near_zero_and_grows_with_added_noise():
  x, labels = _digits_features()
  order = np.random.default_rng(0).permutation(len(x))
  x, labels = x[order], labels[order]
  a, b = x[: len(x) // 2], x[len(x) // 2:]
  stats = lambda z: (z.mean(0), np.cov(z, rowvar=False))  # noqa: E731
  between_classes = fid.frechet_distance(*stats(x[labels == 0]), *stats(x[labels == 1]))
  noise = np.random.default_rng(1).normal(size=b.shape)
  fds = [fid.frechet_distance(*stats(a), *stats(b + s * noise)) for s in (0.0, 0.03, 0.1, 0.3, 1.0)]
  assert 0 <= fds[0] < 0.01 * between_classes
  assert all(f0 < f1 for f0, f1 in zip(fds, fds[1:])), fds
  assert fds[-1] > 3 * between_classes


# --- RunningStats -------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_running_stats_matches_numpy_over_uneven_batches_and_merge(offset):
  rng = np.random.default_rng(3)
  d = 6
  x = offset + rng.normal(size=(261, d)) @ rng.normal(size=(d, d))
  want_mean, want_cov = np.mean(x, axis=0), np.cov(x, rowvar=False)
  sizes = [1, 7, 0, 50, 3, 100, 100]
  parts = np.split(x, np.cumsum(sizes)[:-1])
  stats = fid.RunningStats(d)
  for p in parts:
    stats.update(p)
  assert stats.count == len(x)
  np.testing.assert_allclose(stats.mean(), want_mean, rtol=1e-10, atol=0)
  np.testing.assert_allclose(stats.covariance(), want_cov, rtol=1e-10, atol=1e-10 * np.abs(want_cov).max())
  # Partial stats over different parts (different shifts) merged, and merging into/of empty stats.
  first, second = fid.RunningStats(d), fid.RunningStats(d)
  first.update(x[:130])
  second.update(x[130:200] - 0.0).update(x[200:])
  merged = fid.RunningStats(d).merge(first).merge(second).merge(fid.RunningStats(d))
  assert merged.count == len(x)
  np.testing.assert_allclose(merged.mean(), want_mean, rtol=1e-10, atol=0)
  np.testing.assert_allclose(merged.covariance(), want_cov, rtol=1e-10, atol=1e-10 * np.abs(want_cov).max())
  if offset:  # The naive Σxxᵀ/n − μμᵀ loses ~8 digits here: the shift is what keeps 1e-10.
    naive = (x.T @ x - len(x) * np.outer(x.mean(0), x.mean(0))) / (len(x) - 1)
    assert np.abs(naive - want_cov).max() > 1e-9 * np.abs(want_cov).max()


def test_running_stats_rejects_bad_input():
  stats = fid.RunningStats(4)
  with pytest.raises(UserError, match="feature dimension 3, expected 4"):
    stats.update(np.zeros((2, 3)))
  with pytest.raises(UserError, match="2-D"):
    stats.update(np.zeros(4))
  with pytest.raises(UserError, match="non-finite"):
    stats.update(np.full((2, 4), np.nan))
  with pytest.raises(UserError, match="at least 1"):
    stats.mean()
  stats.update(np.ones((1, 4)))
  with pytest.raises(UserError, match="at least 2 feature vectors, got 1"):
    stats.covariance()
  with pytest.raises(UserError, match="dimension 5 into one of dimension 4"):
    stats.merge(fid.RunningStats(5))


# --- KID ----------------------------------------------------------------------------------------


def _brute_force_mmd2(x, y):
  """Unbiased MMD² with k(a, b) = (a·b/d + 1)³ by explicit loops over pairs."""
  m, d = len(x), x.shape[1]
  k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
  kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return kxx + kyy - 2 * kxy


def test_kid_matches_brute_force_mmd2_on_whole_sets():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(60, 5)), rng.normal(0.3, 1.2, size=(60, 5))
  mean, std = fid.kernel_inception_distance(x, y, num_subsets=1, subset_size=60)
  assert mean == pytest.approx(_brute_force_mmd2(x, y), rel=1e-10, abs=1e-12)
  assert std == 0.0
  # subset_size is clipped to the smaller set, so asking for more than 60 gives the same number.
  assert fid.kernel_inception_distance(x, y, num_subsets=1, subset_size=1000)[0] == pytest.approx(mean, rel=1e-10)


def test_kid_near_zero_for_one_distribution_and_positive_for_shifted():
  rng = np.random.default_rng(5)
  d = 16
  a, b = rng.normal(size=(800, d)), rng.normal(size=(800, d))
  mean, std = fid.kernel_inception_distance(a, b, num_subsets=50, subset_size=200, seed=0)
  assert abs(mean) < 3 * std
  mean_shift, std_shift = fid.kernel_inception_distance(a, b + 0.5, num_subsets=50, subset_size=200, seed=0)
  assert mean_shift > 10 * std_shift > 0
  # Seeded: the same seed gives the same subsets.
  assert fid.kernel_inception_distance(a, b, num_subsets=50, subset_size=200, seed=0) == (mean, std)


def test_kid_rejects_bad_input():
  with pytest.raises(UserError, match="≥ 2 rows"):
    fid.kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))
  with pytest.raises(UserError, match="feature dimension 4, expected 3"):
    fid.kernel_inception_distance(np.zeros((5, 3)), np.zeros((5, 4)))


# --- precision / recall -------------------------------------------------------------------------


def _brute_force_precision_recall(real, fake, k):
  def d2(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  real_radii = np.sort(d2(real, real), axis=1)[:, k]  # Index 0 is the point itself.
  fake_radii = np.sort(d2(fake, fake), axis=1)[:, k]
  precision = np.mean((d2(fake, real) <= real_radii[None, :]).any(axis=1))
  recall = np.mean((d2(real, fake) <= fake_radii[None, :]).any(axis=1))
  return precision, recall


def test_precision_recall_matches_brute_force_and_blocking_does_not_matter():
  rng = np.random.default_rng(6)
  real, fake = rng.normal(size=(90, 7)), rng.normal(0.4, 0.8, size=(70, 7))
  for k in (1, 3, 5):
    want = _brute_force_precision_recall(real, fake, k)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    assert fid.precision_recall(real, fake, k=k) == want
    for batch_size in (1, 7, 64):
      assert fid.precision_recall(real, fake, k=k, batch_size=batch_size) == want


def test_precision_recall_identical_sets_and_shift():
  x, _ = _digits_features()
  x = x[np.random.default_rng(0).permutation(len(x))]
  real, fake = x[:800], x[800:1600]
  assert fid.precision_recall(real, real, batch_size=300) == (1.0, 1.0)  # Exact: duplicates included.
  results = [fid.precision_recall(real, fake + s, batch_size=300) for s in (0.0, 0.1, 0.2, 0.4)]
  precisions, recalls = zip(*results)
  assert precisions[0] > 0.8 and recalls[0] > 0.8
  assert all(p0 > p1 for p0, p1 in zip(precisions, precisions[1:])), precisions
  assert all(r0 > r1 for r0, r1 in zip(recalls, recalls[1:])), recalls


def test_precision_recall_rejects_bad_input():
  with pytest.raises(UserError, match="fake has 3 rows; k=3 needs more than 3"):
    fid.precision_recall(np.zeros((10, 2)), np.zeros((3, 2)))
  with pytest.raises(UserError, match="k must be a positive integer"):
    fid.precision_recall(np.zeros((10, 2)), np.zeros((10, 2)), k=0)


# --- Inception Score ----------------------------------------------------------------------------


def test_inception_score_uniform_and_confident():
  assert fid.inception_score(np.zeros((100, 10)), splits=10) == (1.0, 0.0)
  labels = np.arange(200) % 10  # Every consecutive part of 20 holds every class twice.
  logits = 60.0 * np.eye(10)[labels]
  mean, std = fid.inception_score(logits, splits=10)
  assert mean == pytest.approx(10.0, abs=1e-6)
  assert std < 1e-6
  # Logits so large that the other classes underflow to probability 0 still give exactly C.
  assert fid.inception_score(1e4 * np.eye(10)[labels], splits=1)[0] == pytest.approx(10.0, rel=1e-12)


def test_inception_score_small_case_by_hand():
  p1, p2 = np.array([0.75, 0.25]), np.array([0.25, 0.75])
  logits = np.log(np.stack([p1, p2, p1, p1])) + 3.0  # Softmax is shift-invariant.
  # Part 1 = {p1, p2}: p(y) = (½, ½), KL(p1‖p(y)) = KL(p2‖p(y)) = ¾ ln(3/2) + ¼ ln(1/2).
  # Part 2 = {p1, p1}: p(y) = p1, KL = 0 → IS = 1.
  is1 = math.exp(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
  mean, std = fid.inception_score(logits, splits=2)
  assert mean == pytest.approx((is1 + 1) / 2, rel=1e-12)
  assert std == pytest.approx(abs(is1 - 1) / 2, rel=1e-10)
  assert fid.inception_score(logits[:2], splits=1)[0] == pytest.approx(is1, rel=1e-12)
  with pytest.raises(UserError, match=r"splits must be an integer in \[1, 4\]"):
    fid.inception_score(logits, splits=5)


# --- reference statistics files -----------------------------------------------------------------


def test_stats_file_round_trip(tmp_path):
  rng = np.random.default_rng(7)
  features = rng.normal(size=(20, 3))
  mu, sigma = features.mean(0), np.cov(features, rowvar=False)
  path = str(tmp_path / "new" / "dir" / "digits_train.npz")
  fid.save_stats(path, mu, sigma, features=features, feature_network="pixels", dataset="digits",
                 split="train", num_images=20)
  assert os.listdir(os.path.dirname(path)) == ["digits_train.npz"]  # No temporary file left.
  ref = fid.load_stats(path, dim=3)
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma, sigma)
  np.testing.assert_array_equal(ref.features, features)
  assert ref.metadata == {"feature_network": "pixels", "dataset": "digits", "split": "train", "num_images": 20}
  assert ref.dim == 3
  # The published layout: just mu and sigma (as np.savez writes them).
  np.savez(tmp_path / "published.npz", mu=mu, sigma=sigma)
  ref = fid.load_stats(str(tmp_path / "published.npz"))
  assert ref.features is None and ref.metadata == {}
  with pytest.raises(dataclasses.FrozenInstanceError):
    ref.mu = mu  # Frozen.


def test_stats_file_bad_inputs(tmp_path):
  good_mu, good_sigma = np.zeros(3), np.eye(3)

  def write(name, **arrays):
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return path

  with pytest.raises(UserError, match="missing.npz does not exist"):
    fid.load_stats(str(tmp_path / "missing.npz"))
  text = tmp_path / "text.npz"
  text.write_text("not a zip file")
  with pytest.raises(UserError, match="text.npz is not a readable .npz"):
    fid.load_stats(str(text))
  np.save(tmp_path / "array.npy", good_mu)
  with pytest.raises(UserError, match="single .npy array"):
    fid.load_stats(str(tmp_path / "array.npy"))
  with pytest.raises(UserError, match="has no 'sigma' entry"):
    fid.load_stats(write("no_sigma.npz", mu=good_mu))
  with pytest.raises(UserError, match="has no 'mu' entry"):
    fid.load_stats(write("no_mu.npz", sigma=good_sigma))
  with pytest.raises(UserError, match=r"'mu' must be 1-D \[D\], got shape \(1, 3\)"):
    fid.load_stats(write("mu_2d.npz", mu=good_mu[None], sigma=good_sigma))
  with pytest.raises(UserError, match=r"'sigma' must be \[3, 3\] to match 'mu' \[3\], got shape \(3, 2\)"):
    fid.load_stats(write("sigma_shape.npz", mu=good_mu, sigma=np.zeros((3, 2))))
  path = str(tmp_path / "inception.npz")
  fid.save_stats(path, good_mu, good_sigma, feature_network="inception_v3")
  with pytest.raises(UserError, match=r"inception.npz has feature dimension 3, expected 2048: it was computed "
                                      r"with another feature network \(inception_v3\)"):
    fid.load_stats(path, dim=2048)
  with pytest.raises(UserError, match="'sigma' contains non-finite"):
    fid.load_stats(write("nan.npz", mu=good_mu, sigma=np.full((3, 3), np.nan)))
  with pytest.raises(UserError, match=r"'features' must be \[N, 3\]"):
    fid.load_stats(write("features.npz", mu=good_mu, sigma=good_sigma, features=np.zeros((4, 2))))
  with pytest.raises(UserError, match="metadata note=.* must be a str, int, float or bool"):
    fid.save_stats(str(tmp_path / "x.npz"), good_mu, good_sigma, note=[1, 2])
