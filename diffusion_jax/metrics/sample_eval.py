"""Sample quality the way papers report it: N samples per setting, streamed through a feature network.

    evaluator = SampleEvaluator(run, network, reference, num_samples=10_000, batch_size=256, ...)
    results = evaluator.evaluate(params, settings_for(kind, scales=[1, 2, 3, 5]))

Per setting (a guidance scale; for text models also a caption template) the evaluator samples N images in
global batches sharded over every device of `run.mesh` (every process of a multi-host job runs the same
loop), turns them into uint8, and runs the feature network in the same jitted call. Only features leave
the devices: the mean and covariance are accumulated in float64 on the host (`fid.RunningStats`), and
the features of the first `max_features` samples are kept for KID and precision/recall — 50,000
samples never need 50,000 images in memory. Sample i of every setting starts from the same noise, so
a guidance sweep compares the scales on the same draws.

Metrics per setting: the Fréchet distance ('fid' in Inception features, 'fd' in others), 'kid' ± 'kid_std',
'precision', 'recall' (k=3), 'is' ± 'is_std' (from the network's logits) and, where the dataset has a
reference classifier, 'accuracy' (is a sample of class c recognized as c?).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffusion_jax import compiler, generation
from diffusion_jax.diffusion import samplers
from diffusion_jax.metrics import fid
from diffusion_jax.metrics.features import FeatureNetwork
from diffusion_jax.parallel import mesh as mesh_lib

MIN_SAMPLES = 4  # Precision/recall's k = 3 neighbours need 4 points.
GRID_ROWS = 8  # Sample grids: this many rows of the first samples (class models: one class per column).


@dataclasses.dataclass(frozen=True)
class Setting:
  """What one set of N samples is drawn with: a guidance scale and, for text models, a caption template."""

  guidance_scale: float
  template: int | None = None

  @property
  def name(self) -> str:
    """'template_0/guidance_3', 'guidance_3', or '' for unconditional models (no guidance)."""
    if self.guidance_scale is None:
      return ""
    guidance = f"guidance_{self.guidance_scale:g}"
    return guidance if self.template is None else f"template_{self.template}/{guidance}"


def settings_for(conditioning_kind: str, scales: Sequence[float], templates: Sequence[int] = (0,)) -> list[Setting]:
  """Every (template, scale) for text models, every scale for class models, one setting without guidance
  for unconditional models."""
  if conditioning_kind == "none":
    return [Setting(None)]
  if conditioning_kind == "class":
    return [Setting(float(s)) for s in scales]
  return [Setting(float(s), t) for t in templates for s in scales]


def metric_key(metric: str, setting: Setting) -> str:
  return f"{metric}/{setting.name}" if setting.name else metric


def _guides(setting: Setting) -> bool:
  """Whether `setting` samples with guidance: scale 1 is the conditional prediction, with no unconditional
  half of the batch to evaluate."""
  return setting.guidance_scale is not None and setting.guidance_scale != 1.0


def _compile(jitted, args: tuple) -> None:
  jitted.lower(*args).compile()


def round_batch(batch_size: int, mesh) -> int:
  """`batch_size` rounded up to a multiple of the data-parallel devices (every device gets a share)."""
  devices = mesh_lib.data_parallel_size(mesh)
  return -(-batch_size // devices) * devices


def _to_global(tree: Any, sharding) -> Any:
  """Host arrays, identical on every process, as global arrays with `sharding` (single- or multi-host)."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def _replicate(tree: Any, sharding) -> Any:
  """Parameters (host arrays, or global arrays in any sharding, e.g. training's) replicated on the mesh."""
  def put(x):
    if isinstance(x, jax.Array):
      return jax.device_put(x, sharding)
    return _to_global(x, sharding)
  return jax.tree.map(put, tree)


def _to_host(x: jax.Array) -> np.ndarray:
  """A replicated global array as numpy on this process (each process holds a full copy)."""
  return np.asarray(x.addressable_data(0))


def _uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] → uint8, exactly as images.to_uint8 (what a saved PNG would hold)."""
  return jnp.round((jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


class Featurizer:
  """The feature network jitted on a mesh: uint8 images (host, any count) → (features [N, D], logits [N, C]).

  Batches are padded to a fixed size, so it compiles once."""

  def __init__(self, network: FeatureNetwork, mesh, batch_size: int):
    self.network, self.batch_size = network, round_batch(batch_size, mesh)
    self._batch = mesh_lib.batch_sharding(mesh)
    replicated = mesh_lib.replicated(mesh)
    self._variables = _to_global(network.variables, replicated)
    self._apply = compiler.jit(network.apply, in_shardings=(replicated, self._batch), out_shardings=replicated)

  def __call__(self, images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features, logits = [], []
    for start in range(0, len(images_uint8), self.batch_size):
      chunk = np.asarray(images_uint8[start:start + self.batch_size])
      padded = np.concatenate([chunk, np.zeros((self.batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
      f, l = self._apply(self._variables, _to_global(padded, self._batch))
      features.append(_to_host(f)[:len(chunk)])
      logits.append(_to_host(l)[:len(chunk)])
    return np.concatenate(features), np.concatenate(logits)


@dataclasses.dataclass
class SettingResult:
  """metrics: {metric name: value}; grid: uint8 [k, H, W, C], the first samples (for a PNG grid)."""

  setting: Setting
  metrics: dict[str, float]
  grid: np.ndarray
  grid_rows: int


class Progress:
  """Log lines with rate and ETA, at most every `every_seconds` (and at the end)."""

  def __init__(self, what: str, total: int, every_seconds: float = 10.0):
    self.what, self.total, self.every = what, total, every_seconds
    self.start = self.last = time.monotonic()

  def update(self, done: int) -> None:
    now = time.monotonic()
    if now - self.last < self.every and done < self.total:
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else math.inf
    logging.info("%s: %d/%d (%.0f%%), %.1f/s, ETA %.0f s", self.what, done, self.total, 100 * done / self.total,
                 rate, eta)


class SampleEvaluator:
  """Samples N images per setting with a compiled-once sampler and compares them with real data.

  Args:
    run: the model's build.Run (its mesh shards the samples).
    network: the feature network; reference: the real data's statistics in its features (`features`
      may be None, e.g. for published statistics: then no KID or precision/recall).
    num_samples: N per setting. batch_size: global batch (rounded up to a multiple of the devices).
    options: the sampler. seed: sample i is drawn from fold_in(PRNGKey(seed), i // batch_size).
    classifier: the dataset's reference classifier (.predict(uint8 images) → labels), or None.
    max_features: KID and precision/recall use at most this many samples (and real images).
  """

  def __init__(self, run, network: FeatureNetwork, reference: fid.ReferenceStats, *, num_samples: int,
               batch_size: int, options: samplers.SamplerOptions, seed: int, classifier: Any = None,
               max_features: int = 10_000, negative_prompt: str = ""):
    self.run, self.network, self.reference = run, network, reference
    self.num_samples, self.seed, self.classifier = num_samples, seed, classifier
    self.max_features, self.negative_prompt = max_features, negative_prompt
    self.classifier_test_accuracy = None  # The classifier's accuracy on real test images, if known.
    self.batch_size = round_batch(min(batch_size, num_samples), run.mesh)
    self._batch = mesh_lib.batch_sharding(run.mesh)
    self._replicated = mesh_lib.replicated(run.mesh)
    self._network_variables = _to_global(network.variables, self._replicated)
    self._options = options
    self._steps: dict[bool, Any] = {}  # guide → jitted sample-and-featurize, compiled on first use.

  def _step(self, guide: bool):
    """The jitted (params, network variables, inputs, null inputs, scales [b], rng) → (uint8 images,
    features, logits) that samples with guidance (`guide`) or from the conditional prediction alone."""
    if guide not in self._steps:
      sample = generation.make_sample(self.run.model, self.run.schedule, self._options, self.run.autoencoder,
                                      guide=guide)
      network = self.network

      def sample_and_featurize(params, network_variables, inputs, null_inputs, scales, rng):
        images = _uint8(sample(params, inputs, null_inputs, scales, rng))
        features, logits = network.apply(network_variables, images)
        return images, features, logits

      self._steps[guide] = compiler.jit(
          sample_and_featurize, out_shardings=self._replicated,
          in_shardings=(self._replicated, self._replicated, self._batch, self._batch, self._batch, self._replicated))
    return self._steps[guide]

  def _batch_args(self, setting: Setting, batch_index: int) -> tuple[np.ndarray, tuple]:
    """(requested labels [b], the step's arguments after the parameters and network variables: inputs,
    null inputs, scales [b], key) of batch `batch_index` of `setting`, as global arrays."""
    b = self.batch_size
    requests, labels = self._requests(setting, np.arange(batch_index * b, (batch_index + 1) * b))
    scale = 1.0 if setting.guidance_scale is None else setting.guidance_scale
    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), batch_index)
    return labels, (_to_global(self.run.conditioning.inputs_for(requests), self._batch),
                    _to_global(self.run.conditioning.null_inputs(b, self.negative_prompt), self._batch),
                    _to_global(np.full((b,), scale, np.float32), self._batch),
                    _to_global(jax.device_get(rng), self._replicated))

  def compile(self, abstract_params: Any, settings: Sequence[Setting]) -> list[Callable[[], None]]:
    """One function per sampler program that `evaluate(params, settings)` will run (guided, unguided),
    each compiling it ahead of that call for parameters of `abstract_params`' shapes (placed as
    `evaluate` places them): for a caller with idle cores now, to run in parallel. Call them from any
    thread, but all of them before `evaluate` (which would otherwise compile the same program again)."""
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._replicated),
                          abstract_params)
    compiles = []
    for guide in sorted({_guides(s) for s in settings}):
      setting = next(s for s in settings if _guides(s) == guide)
      _, args = self._batch_args(setting, 0)
      compiles.append(functools.partial(_compile, self._step(guide), (params, self._network_variables) + args))
    return compiles

  def _requests(self, setting: Setting, indices: np.ndarray) -> tuple[list[Any], np.ndarray]:
    """(requests, requested labels) of global sample indices: labels cycle through the classes, so
    every class gets N / num_classes samples."""
    dataset, kind = self.run.dataset, self.run.conditioning.kind
    labels = indices % dataset.num_classes
    if kind == "text":
      return [dataset.caption_for(int(l), setting.template or 0) for l in labels], labels
    if kind == "class":
      return [int(l) for l in labels], labels
    return [None] * len(indices), labels

  def evaluate(self, params: Any, settings: Sequence[Setting]) -> list[SettingResult]:
    """One SettingResult per setting, in order. `params`: the model's (EMA) parameters, on the host or
    as global arrays (training's)."""
    params = _replicate(params, self._replicated)
    return [self._evaluate_setting(params, setting) for setting in settings]

  def _evaluate_setting(self, params: Any, setting: Setting) -> SettingResult:
    n, b = self.num_samples, self.batch_size
    conditioning = self.run.conditioning
    stats = fid.RunningStats(self.network.dim)
    kept_features, logits_all, correct, predicted_all = [], [], 0, []
    # Labels cycle through the classes, so rows of num_classes put one class in each column.
    grid_count = GRID_ROWS * (self.run.dataset.num_classes if conditioning.kind != "none" else 8)
    grid = []
    progress = Progress(f"sampling {setting.name or 'unconditional'}", n)
    step = self._step(guide=_guides(setting))
    for batch_index, start in enumerate(range(0, n, b)):
      labels, args = self._batch_args(setting, batch_index)
      images, features, logits = step(params, self._network_variables, *args)
      valid = min(b, n - start)
      images, features, logits = (_to_host(x)[:valid] for x in (images, features, logits))
      stats.update(features)
      kept = sum(len(f) for f in kept_features)
      if kept < self.max_features:
        kept_features.append(features[:self.max_features - kept])
      logits_all.append(logits)
      if len(grid) * b < grid_count:
        grid.append(images)
      if self.classifier is not None:
        predicted = self.classifier.predict(images)
        correct += int(np.sum(predicted == labels[:valid]))
        predicted_all.append(predicted)
      progress.update(start + valid)

    metrics = self._compare(stats, np.concatenate(kept_features), np.concatenate(logits_all))
    if self.classifier is not None:
      if conditioning.kind == "none":  # Do unconditional samples cover every class?
        predicted = np.concatenate(predicted_all)
        fractions = [float(np.mean(predicted == c)) for c in range(self.run.dataset.num_classes)]
        metrics.update({f"class_fraction/{c}": f for c, f in enumerate(fractions)})
        metrics["min_class_fraction"] = min(fractions)
      else:
        metrics["accuracy"] = correct / n
    grid_images = np.concatenate(grid)[:grid_count]
    return SettingResult(setting, {metric_key(k, setting): v for k, v in metrics.items()}, grid_images,
                         grid_rows=min(GRID_ROWS, -(-len(grid_images) // max(1, grid_count // GRID_ROWS))))

  def _compare(self, stats: fid.RunningStats, features: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    ref = self.reference
    metrics = {self.network.fd_name: fid.frechet_distance(stats.mean(), stats.covariance(), ref.mu, ref.sigma)}
    if ref.features is not None:
      real = ref.features[:self.max_features]
      metrics["kid"], metrics["kid_std"] = fid.kernel_inception_distance(features, real, seed=self.seed)
      count = min(len(features), len(real))
      metrics["precision"], metrics["recall"] = fid.precision_recall(real[:count], features[:count], k=3)
    metrics["is"], metrics["is_std"] = fid.inception_score(logits, splits=min(10, len(logits)))
    return {k: float(v) for k, v in metrics.items()}


def reference_statistics(run, featurizer: Featurizer, *, split: str, cache: str, max_features: int = 10_000
                         ) -> fid.ReferenceStats:
  """Mean, covariance (all images of `split`) and the first `max_features` features of the real data in
  `featurizer`'s network, computed once per dataset, split and network weights and cached in `cache`
  (an .npz in the layout of published FID statistics, plus 'features')."""
  network = featurizer.network
  path = os.path.join(cache, "reference_stats",
                      f"{run.dataset.file_stem}-{split}-{network.name}-{network.fingerprint}.npz")
  if os.path.exists(path):
    try:
      return fid.load_stats(path, dim=network.dim)
    except Exception as exc:  # pylint: disable=broad-except  (a damaged cache is recomputed, not fatal)
      logging.warning("Recomputing the reference statistics: %s", exc)
  from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (grain/TFDS)
  stats, kept = fid.RunningStats(network.dim), []
  logging.info("Computing the reference statistics of %s/%s in the %r features (once; cached in %s).",
               run.dataset.name, split, network.name, path)
  for batch in pipeline.iterate_split(run.config, split):
    features, _ = featurizer(batch["image"])
    stats.update(features)
    if sum(map(len, kept)) < max_features:
      kept.append(features)
  features = np.concatenate(kept)[:max_features]
  if jax.process_index() == 0:
    fid.save_stats(path, stats.mean(), stats.covariance(), features=features, feature_network=network.name,
                   dataset=run.dataset.name, split=split, num_images=str(stats.count))
  return fid.ReferenceStats(stats.mean(), stats.covariance(), features,
                            {"feature_network": network.name, "dataset": run.dataset.name, "split": split,
                             "num_images": str(stats.count)})


def create_evaluator(run, *, feature_network: str, inception_weights: str, cache: str, num_samples: int,
                     batch_size: int, options: samplers.SamplerOptions, seed: int, reference_stats: str = "",
                     max_features: int = 10_000, negative_prompt: str = "") -> SampleEvaluator:
  """The feature network (weights loaded or trained once), the real data's statistics (a published or own
  .npz given as `reference_stats`, else computed once on the dataset's training split and cached under
  `cache`) and the dataset's reference classifier, assembled into a SampleEvaluator."""
  from diffusion_jax.metrics import features as features_lib  # pylint: disable=g-import-not-at-top
  features_lib.check_images(feature_network, run.dataset.image_shape)
  network = features_lib.get(feature_network, inception_weights=inception_weights, cache=cache)
  featurizer = Featurizer(network, run.mesh, batch_size)
  if reference_stats:
    reference = fid.load_stats(reference_stats, dim=network.dim)
  else:
    reference = reference_statistics(run, featurizer, split=run.dataset.train_split,
                                     cache=features_lib.cache_dir(cache), max_features=max_features)
  classifier, classifier_accuracy = None, None
  if run.dataset.reference_classifier is not None:
    classifier, classifier_accuracy = run.dataset.reference_classifier()
  evaluator = SampleEvaluator(run, network, reference, num_samples=num_samples, batch_size=batch_size,
                              options=options, seed=seed, classifier=classifier, max_features=max_features,
                              negative_prompt=negative_prompt)
  evaluator.classifier_test_accuracy = classifier_accuracy
  return evaluator
