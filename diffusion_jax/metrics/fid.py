"""Sample-quality metrics on features: FID, KID, improved precision/recall, Inception Score.

Everything here works on host numpy arrays of features (rows = images), whatever network made them,
and follows the reference implementations so numbers are comparable with published ones:
  - Fréchet distance (Heusel et al. 2017; pytorch-fid `calculate_frechet_distance` / TTUR),
  - Kernel Inception Distance (Bińkowski et al. 2018; torch-fidelity's unbiased polynomial MMD²),
  - improved precision and recall (Kynkäänniemi et al. 2019, k-NN balls),
  - Inception Score (Salimans et al. 2016; openai improved-gan / torch-fidelity splits).
`RunningStats` streams the mean and covariance of 50,000 feature vectors batch by batch, and
`save_stats` / `load_stats` read and write reference statistics in the `.npz` layout of published FID
statistics (`mu` [D], `sigma` [D, D]), optionally with `features` [N, D] and metadata.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import zipfile
from typing import Any, Mapping

from absl import logging
import numpy as np
from scipy import linalg

from diffusion_jax import paths
from diffusion_jax.errors import UserError

_METADATA_TYPES = (str, int, float, bool)


def _as_features(name: str, x, dim: int | None = None) -> np.ndarray:
  """float64 [N, D] view (or copy) of `x`, or a UserError naming `name`'s bad shape/values."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise UserError(f"{name} must be a 2-D array [N, D] (rows = images), got shape {x.shape}")
  if dim is not None and x.shape[1] != dim:
    raise UserError(f"{name} has feature dimension {x.shape[1]}, expected {dim} (shape {x.shape})")
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise UserError(f"{name} must be real numbers, got dtype {x.dtype}")
  x = x.astype(np.float64, copy=False)
  if not np.isfinite(x).all():
    raise UserError(f"{name} contains non-finite values (NaN or inf); all features must be finite")
  return x


class RunningStats:
  """Streamed mean and unbiased covariance of D-dimensional features, accumulated in float64.

  Precision: sums are taken of x − c with a fixed shift c = the mean of the first non-empty batch, so
  Σ (x−c)(x−c)ᵀ − n m'm'ᵀ (m' = mean − c) never cancels two huge numbers when the features sit far
  from the origin (e.g. mean 1e4). `merge` re-expresses the other's sums about this shift exactly.
  """

  def __init__(self, dim: int):
    if int(dim) != dim or dim < 1:
      raise UserError(f"RunningStats dim must be a positive integer, got {dim!r}")
    self.dim = int(dim)
    self._n = 0
    self._shift = np.zeros(dim, np.float64)  # c: set by the first non-empty batch.
    self._sum = np.zeros(dim, np.float64)  # Σ (x − c), [D].
    self._outer = np.zeros((dim, dim), np.float64)  # Σ (x − c)(x − c)ᵀ, [D, D].

  @property
  def count(self) -> int:
    """The number of feature vectors accumulated."""
    return self._n

  def update(self, features) -> "RunningStats":
    """Adds a batch of features [B, D] (any real dtype; B may be 0). Returns self."""
    x = _as_features("features", features, self.dim)
    if x.shape[0] == 0:
      return self
    if self._n == 0:
      self._shift = x.mean(axis=0)
    x = x - self._shift
    self._n += x.shape[0]
    self._sum += x.sum(axis=0)
    self._outer += x.T @ x
    return self

  def merge(self, other: "RunningStats") -> "RunningStats":
    """Adds the samples summarized by `other` (e.g. from another host or shard) to self. Returns self."""
    if not isinstance(other, RunningStats):
      raise UserError(f"RunningStats.merge takes a RunningStats, got {type(other).__name__}")
    if other.dim != self.dim:
      raise UserError(f"cannot merge RunningStats of dimension {other.dim} into one of dimension {self.dim}")
    if other._n == 0:
      return self
    if self._n == 0:
      self._n, self._shift = other._n, other._shift.copy()
      self._sum, self._outer = other._sum.copy(), other._outer.copy()
      return self
    # x − c1 = (x − c2) + δ with δ = c2 − c1, so Σ(x−c1) = s2 + n2 δ and
    # Σ(x−c1)(x−c1)ᵀ = S2 + s2 δᵀ + δ s2ᵀ + n2 δ δᵀ.
    delta = other._shift - self._shift
    self._outer += (other._outer + np.outer(other._sum, delta) + np.outer(delta, other._sum)
                    + other._n * np.outer(delta, delta))
    self._sum += other._sum + other._n * delta
    self._n += other._n
    return self

  def mean(self) -> np.ndarray:
    """The mean of all features so far, float64 [D] (needs count ≥ 1)."""
    if self._n < 1:
      raise UserError("RunningStats.mean needs at least 1 feature vector, got 0")
    return self._shift + self._sum / self._n

  def covariance(self) -> np.ndarray:
    """The unbiased (ddof=1) covariance, float64 [D, D], equal to np.cov(x, rowvar=False) (needs count ≥ 2)."""
    if self._n < 2:
      raise UserError(f"RunningStats.covariance needs at least 2 feature vectors, got {self._n}")
    m = self._sum / self._n  # Mean about the shift.
    cov = (self._outer - self._n * np.outer(m, m)) / (self._n - 1)
    return (cov + cov.T) / 2  # Exactly symmetric (the outer-product sums are, up to rounding).


def _sqrtm(a: np.ndarray) -> np.ndarray:
  """scipy's Schur-method square root of a [D, D] matrix, as `sqrtm(a, disp=False)` did before SciPy 1.16.

  SciPy ≥ 1.16 deprecates `disp` (a DeprecationWarning, removal in 1.18) and warns with LinAlgWarning
  for singular or ill-conditioned input; `disp=False` used to be silent, and the caller checks the
  result for non-finite values itself, so those warnings are suppressed here.
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in squared feature units.

  d² = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}, computed as pytorch-fid / TTUR do: float64,
  scipy's sqrtm of the product; if that is not finite (nearly singular product), eps·I is added to
  both covariances (with a logged warning); a complex square root is replaced by its real part when
  the imaginary diagonal is within 1e-3 of zero, else ValueError.

  Args:
    mu1, mu2: means [D].
    sigma1, sigma2: covariances [D, D].
    eps: the diagonal offset for a singular product.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise UserError(f"frechet_distance: the means must be 1-D with equal shapes, got mu1 {mu1.shape} and "
                    f"mu2 {mu2.shape}")
  d = mu1.shape[0]
  if sigma1.shape != sigma2.shape or sigma1.shape != (d, d):
    raise UserError(f"frechet_distance: the covariances must both be [{d}, {d}] to match the means, "
                    f"got sigma1 {sigma1.shape} and sigma2 {sigma2.shape}")
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning("frechet_distance: the product of covariances is nearly singular; adding %g to the "
                    "diagonal of both covariance estimates", eps)
    offset = np.eye(d) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"frechet_distance: the square root of the covariance product has an imaginary "
                       f"component of magnitude {np.max(np.abs(covmean.imag)):g}")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """k(x, y) = (x·y / d + 1)³ for rows of x [M, D] and y [N, D] → [M, N] (KID's kernel)."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """The unbiased MMD² estimate of Bińkowski et al. for equal-size samples x, y [m, D] (m ≥ 2):
  the within-set kernel means exclude their diagonals (i = j), the cross-set mean keeps all m² pairs."""
  m = x.shape[0]
  k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(features_a, features_b, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """(mean, std) of KID over `num_subsets` random subset pairs, in squared-kernel units.

  As torch-fidelity: per subset, `subset_size` rows drawn without replacement from each set, the
  unbiased MMD² with the cubic polynomial kernel (x·y/d + 1)³; the std is over subsets (ddof=0).
  subset_size is clipped to min(len(a), len(b)), which must be ≥ 2.

  Args:
    features_a, features_b: [Na, D] and [Nb, D].
    seed: seeds the numpy Generator that draws the subsets.
  """
  a = _as_features("features_a", features_a)
  b = _as_features("features_b", features_b, a.shape[1])
  if num_subsets < 1:
    raise UserError(f"kernel_inception_distance: num_subsets must be ≥ 1, got {num_subsets}")
  m = min(int(subset_size), a.shape[0], b.shape[0])
  if m < 2:
    raise UserError(f"kernel_inception_distance needs subsets of ≥ 2 rows: subset_size {subset_size}, "
                    f"features_a has {a.shape[0]} rows, features_b has {b.shape[0]}")
  rng = np.random.default_rng(seed)
  mmds = np.empty(num_subsets)
  for i in range(num_subsets):
    xa = a[rng.choice(a.shape[0], m, replace=False)]
    xb = b[rng.choice(b.shape[0], m, replace=False)]
    mmds[i] = _mmd2_unbiased(xa, xb)
  return float(mmds.mean()), float(mmds.std())


def _sq_norms(x: np.ndarray) -> np.ndarray:
  return np.einsum("ij,ij->i", x, x)


def _sq_distances(x: np.ndarray, x_sq: np.ndarray, y: np.ndarray, y_sq: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances [M, N] between rows of x [M, D] and y [N, D] as ‖x‖² + ‖y‖² − 2x·y.

  The expansion's rounding error is ≈ D·ε·(‖x‖² + ‖y‖²), so values below that are noise: they are set
  to exactly 0 (which also clamps negatives), so that duplicate rows are at distance 0 in every block.
  """
  d2 = x_sq[:, None] + y_sq[None, :] - 2.0 * (x @ y.T)
  noise = (8 * x.shape[1] * np.finfo(np.float64).eps) * (x_sq[:, None] + y_sq[None, :])
  d2[d2 <= noise] = 0.0
  return d2


def _knn_radii(x: np.ndarray, x_sq: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  """Squared distance [N] from each row of x [N, D] to its k-th nearest neighbour in x, itself excluded.

  Blocked over rows and columns: a running set of the k+1 smallest squared distances per row (the
  point itself, at distance 0, is one of them, as in the reference's index-k of a sorted row).
  """
  n = x.shape[0]
  radii = np.empty(n)
  for r0 in range(0, n, batch_size):
    r1 = min(r0 + batch_size, n)
    best = np.full((r1 - r0, k + 1), np.inf)
    for c0 in range(0, n, batch_size):
      c1 = min(c0 + batch_size, n)
      d2 = _sq_distances(x[r0:r1], x_sq[r0:r1], x[c0:c1], x_sq[c0:c1])
      rows = np.arange(max(r0, c0), min(r1, c1))
      d2[rows - r0, rows - c0] = 0.0  # A point's distance to itself, exactly.
      best = np.partition(np.concatenate([best, d2], axis=1), k, axis=1)[:, :k + 1]
    radii[r0:r1] = best.max(axis=1)
  return radii


def _fraction_in_manifold(ref: np.ndarray, ref_sq: np.ndarray, radii: np.ndarray, query: np.ndarray,
                          query_sq: np.ndarray, batch_size: int) -> float:
  """The fraction of query rows within radius of some reference row: ‖q − r_i‖² ≤ radius_i² for some i."""
  inside = np.zeros(query.shape[0], bool)
  for q0 in range(0, query.shape[0], batch_size):
    q1 = min(q0 + batch_size, query.shape[0])
    for r0 in range(0, ref.shape[0], batch_size):
      r1 = min(r0 + batch_size, ref.shape[0])
      d2 = _sq_distances(query[q0:q1], query_sq[q0:q1], ref[r0:r1], ref_sq[r0:r1])
      inside[q0:q1] |= (d2 <= radii[None, r0:r1]).any(axis=1)
  return float(inside.mean())


def precision_recall(real, fake, *, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
  """(precision, recall) of Kynkäänniemi et al. 2019, each a fraction in [0, 1].

  A set's manifold is the union of balls around its points, each with radius = the distance to the
  point's k-th nearest neighbour in the same set (itself excluded). precision = the fraction of fake
  rows inside the real manifold; recall = the fraction of real rows inside the fake manifold.
  Distances are computed in float64 blocks of batch_size × batch_size, never the full N × N matrix.

  Args:
    real, fake: features [Nr, D] and [Nf, D], each with more than k rows.
    k: the neighbourhood size (3 in the paper).
    batch_size: rows per block (memory ≈ 3 · batch_size² · 8 bytes).
  """
  real = _as_features("real", real)
  fake = _as_features("fake", fake, real.shape[1])
  if int(k) != k or k < 1:
    raise UserError(f"precision_recall: k must be a positive integer, got {k!r}")
  if int(batch_size) != batch_size or batch_size < 1:
    raise UserError(f"precision_recall: batch_size must be a positive integer, got {batch_size!r}")
  k, batch_size = int(k), int(batch_size)
  for name, x in (("real", real), ("fake", fake)):
    if x.shape[0] <= k:
      raise UserError(f"precision_recall: {name} has {x.shape[0]} rows; k={k} needs more than {k}")
  real_sq, fake_sq = _sq_norms(real), _sq_norms(fake)
  real_radii = _knn_radii(real, real_sq, k, batch_size)
  fake_radii = _knn_radii(fake, fake_sq, k, batch_size)
  precision = _fraction_in_manifold(real, real_sq, real_radii, fake, fake_sq, batch_size)
  recall = _fraction_in_manifold(fake, fake_sq, fake_radii, real, real_sq, batch_size)
  return precision, recall


def inception_score(logits, *, splits: int = 10) -> tuple[float, float]:
  """(mean, std) of the Inception Score of Salimans et al. 2016 over `splits` parts (≥ 1; ≤ C ideally).

  As openai improved-gan / torch-fidelity: p(y|x) = softmax(logits) in float64; the rows are split
  into `splits` consecutive parts [i·N/splits, (i+1)·N/splits); per part exp(mean_x KL(p(y|x) ‖ p(y)))
  with p(y) the part's mean; the std is over parts (ddof=0). Terms with p(y|x) = 0 count as 0.

  Args:
    logits: classifier logits [N, C] (N ≥ splits).
  """
  logits = _as_features("logits", logits)
  n = logits.shape[0]
  if int(splits) != splits or splits < 1 or splits > n:
    raise UserError(f"inception_score: splits must be an integer in [1, {n}] (the number of rows), got {splits!r}")
  splits = int(splits)
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    part, log_part = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
    with np.errstate(divide="ignore"):  # log p(y) = -inf only where every p(y|x) in the part is 0.
      log_py = np.log(part.mean(axis=0, keepdims=True))
    kl = np.where(part > 0, part * (log_part - log_py), 0.0).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous.
class ReferenceStats:
  """Reference statistics of a dataset split: mu [D], sigma [D, D] (float64), optional features [N, D],
  and metadata (e.g. feature_network, dataset, split, num_images)."""
  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray | None = None
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def dim(self) -> int:
    """The feature dimension D."""
    return int(self.mu.shape[0])


def save_stats(path: str, mu, sigma, *, features=None, **metadata) -> None:
  """Writes reference statistics to `path` as an .npz with `mu` [D], `sigma` [D, D] (float64), optional
  `features` [N, D], and one 0-d entry per metadata value (str, int, float or bool).

  Atomic: written to a temporary file in the same directory, then renamed over `path` (directories
  are created), so a reader never sees a partial file.
  """
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise UserError(f"save_stats: mu must be [D] and sigma [D, D], got mu {mu.shape} and sigma {sigma.shape}")
  arrays = {"mu": mu, "sigma": sigma}
  if features is not None:
    arrays["features"] = _as_features("features", features, mu.shape[0])
  for key, value in metadata.items():
    if not isinstance(value, _METADATA_TYPES):
      raise UserError(f"save_stats: metadata {key}={value!r} must be a str, int, float or bool, "
                      f"got {type(value).__name__}")
    arrays[key] = np.asarray(value)
  paths.write_npz_atomic(path, arrays)


def load_stats(path: str, *, dim: int | None = None) -> ReferenceStats:
  """Reads reference statistics written by `save_stats` or published for FID (`mu`, `sigma` in an .npz).

  Args:
    path: the .npz file.
    dim: the feature dimension of the network in use (e.g. 2048 for Inception pool3); a file of
      another dimension raises UserError, since it was computed with another feature network.
  Raises:
    UserError: missing file, not an .npz, missing/mis-shaped mu or sigma, wrong dim, non-finite values.
  """
  if not os.path.isfile(path):
    raise UserError(f"reference statistics file {path} does not exist")
  try:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise UserError(f"reference statistics file {path} is a single .npy array, not an .npz with 'mu' and 'sigma'")
    with data:
      contents = {key: data[key] for key in data.files}
  except UserError:
    raise
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f"reference statistics file {path} is not a readable .npz file ({e})") from None
  for key in ("mu", "sigma"):
    if key not in contents:
      raise UserError(f"reference statistics file {path} has no {key!r} entry (found: {sorted(contents)})")
  mu, sigma = contents.pop("mu"), contents.pop("sigma")
  features = contents.pop("features", None)
  if mu.ndim != 1:
    raise UserError(f"reference statistics file {path}: 'mu' must be 1-D [D], got shape {mu.shape}")
  d = mu.shape[0]
  if sigma.shape != (d, d):
    raise UserError(f"reference statistics file {path}: 'sigma' must be [{d}, {d}] to match 'mu' [{d}], "
                    f"got shape {sigma.shape}")
  metadata = {key: value.item() if value.ndim == 0 else value for key, value in contents.items()}
  if dim is not None and d != dim:
    network = f" ({metadata['feature_network']})" if "feature_network" in metadata else ""
    raise UserError(f"reference statistics file {path} has feature dimension {d}, expected {dim}: it was "
                    f"computed with another feature network{network}")
  if features is not None and (features.ndim != 2 or features.shape[1] != d):
    raise UserError(f"reference statistics file {path}: 'features' must be [N, {d}], got shape {features.shape}")
  for key, value in (("mu", mu), ("sigma", sigma), ("features", features)):
    if value is None:
      continue
    if not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
      raise UserError(f"reference statistics file {path}: {key!r} must be real numbers, got dtype {value.dtype}")
    if not np.isfinite(value).all():
      raise UserError(f"reference statistics file {path}: {key!r} contains non-finite values (NaN or inf)")
  return ReferenceStats(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64),
                        features=None if features is None else features.astype(np.float64), metadata=metadata)
