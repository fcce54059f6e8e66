"""Evaluate: checkpoints → FID / FD, KID, precision/recall, IS, accuracy, bits/dim in workdir/eval/<step>.json.

    python -m diffusion_jax.evaluate --workdir=runs/digits [--step=N | --all_steps | --watch] \
        [--guidance_scales=1,2,3,5] [--num_samples=1000]

Which checkpoints: the newest good one (default), `--step=N`, every one not yet evaluated with these
settings (`--all_steps`), or those and each new one while a training run writes them (`--watch`, until
the run's last step is evaluated or no new checkpoint came for --watch_timeout seconds). An exported
directory is evaluated the same way.

Per checkpoint, for each guidance scale (and, for text models, each caption template of --templates):
--num_samples samples, streamed through the dataset's feature network (`metrics/sample_eval.py`) and
compared with the real training images (statistics computed once and cached, or --reference_stats).

Outputs beside the metrics file: `<step>_<setting>.png` sample grids, `<step>_sweep.png` (the Fréchet
distance against precision / recall / accuracy, one point per scale) and TensorBoard scalars.

The metrics file is one flat JSON object: the settings that determine the metrics ("step", "num_samples",
"sampler", "steps", "seed", "feature_network", "reference", and "nll_timesteps", "nll_variance" when the NLL
is computed), then the metrics ("fd/guidance_3", "precision/guidance_3", "accuracy/template_0/guidance_1",
"nll_bits_per_dim", …). Evaluating the same step again with the same settings adds to the file (e.g.
another guidance scale); other settings are refused unless --overwrite replaces the file or --out=PATH
writes elsewhere.
"""

from __future__ import annotations

from diffusion_jax import host_memory

if __name__ == "__main__":
  host_memory.use_huge_pages()  # Re-executes this command with huge pages for XLA's buffers, before JAX loads.

# pylint: disable=wrong-import-position  (the imports below load JAX)
import concurrent.futures
import importlib
import json
import math

import jax
from absl import flags, logging

from diffusion_jax import cli, generation, images, inference, paths, run_files
from diffusion_jax.data import registry
from diffusion_jax.diffusion import samplers
from diffusion_jax.errors import UserError
from diffusion_jax.metrics import features as features_lib
from diffusion_jax.metrics import sample_eval, sample_quality, sweep_plot

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or exported directory to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_ALL_STEPS = flags.DEFINE_bool("all_steps", False, "Evaluate every checkpoint not yet evaluated with these settings.")
_WATCH = flags.DEFINE_bool("watch", False, "Like --all_steps, then keep evaluating new checkpoints of a running "
                           "training until its last step is evaluated.")
_POLL_SECONDS = flags.DEFINE_float("poll_seconds", 30.0, "--watch: seconds between looks for new checkpoints.")
_WATCH_TIMEOUT = flags.DEFINE_float("watch_timeout", 3600.0, "--watch: stop after this many seconds without a "
                                    "new checkpoint.")
_SCALES = flags.DEFINE_list("guidance_scales", ["1", "3"], "Guidance scales to measure (a sweep: e.g. 1,2,3,5).")
_TEMPLATES = flags.DEFINE_string("templates", "0", "Text models: the dataset's caption templates to prompt "
                                 "with, as indices separated by ',', or 'all'.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1000, "Samples per setting (papers: 50000 for FID).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 250, "Global sampling batch (rounded up to a multiple of the "
                                   "devices).")
_SAMPLER = flags.DEFINE_enum("sampler", None, list(samplers.SAMPLERS), "Sampler; default: the run's "
                             "config.sampling.sampler.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps; default: the run's config.sampling.num_steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_FEATURE_NETWORK = flags.DEFINE_string("feature_network", "", "Feature network: 'inception' (FID) or 'digits'; "
                                       "default: the dataset's.")
_INCEPTION_WEIGHTS = flags.DEFINE_string("inception_weights", "", "The FID Inception weights: pytorch-fid's "
                                         "pt_inception-2015-12-05-6726825d.pth or its conversion (README).")
_REFERENCE_STATS = flags.DEFINE_string("reference_stats", "", "An .npz with the real data's 'mu' and 'sigma' "
                                       "(e.g. published FID statistics); default: computed once and cached.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "", "Where feature networks and reference statistics are cached; "
                                 "default: $DIFFUSION_JAX_CACHE_DIR, else ~/.cache/diffusion_jax.")
_MAX_FEATURES = flags.DEFINE_integer("max_features", 10_000, "KID and precision/recall use at most this many "
                                     "samples and real images.")
_NLL_TIMESTEPS = flags.DEFINE_integer("nll_timesteps", 100, "Timesteps sampled per batch for the NLL "
                                      "bound (unbiased estimate), at most T; 0 = all T (exact in t); -1 = skip NLL.")
_NLL_VARIANCE = flags.DEFINE_enum("nll_variance", "auto", list(sample_quality.NLL_VARIANCES),
                                  "Reverse-process variance for the NLL bound: 'auto' = the run's own ('learned' "
                                  "for diffusion.learn_sigma runs, else 'fixed_large'), or one named.")
_OUT = flags.DEFINE_string("out", None, "Metrics JSON to write (an existing directory gets <step>.json inside); "
                           "default: <workdir>/eval/<step>.json.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing metrics file instead of adding to it "
                               "(needed when it was evaluated with other settings).")
flags.mark_flags_as_required(["workdir"])


def parse_scales(values: list[str]) -> list[float]:
  try:
    scales = [float(s) for s in values]
  except ValueError as exc:
    raise UserError(f"--guidance_scales={','.join(values)} does not parse ({exc}); give finite numbers "
                    f"separated by ',', e.g. 1,2,3,5") from exc
  if not scales or not all(math.isfinite(s) for s in scales):
    raise UserError(f"--guidance_scales={','.join(values)} is not allowed; give finite numbers separated by ','")
  return list(dict.fromkeys(scales))


def _parse_templates(text: str, num_templates: int) -> list[int]:
  if text == "all":
    return list(range(num_templates))
  try:
    templates = [int(t) for t in text.split(",")]
  except ValueError:
    templates = [-1]
  if any(not 0 <= t < num_templates for t in templates):
    raise UserError(f"--templates={text!r}: give indices in [0, {num_templates}) or 'all'")
  return templates


def sampler_and_steps(config) -> tuple[str, int]:
  """The sampler and its step count: --sampler and --steps, else the run's config.sampling."""
  sampler = _SAMPLER.value or config.sampling.sampler
  return sampler, config.sampling.num_steps if _STEPS.value is None else _STEPS.value


def _check_counts(config) -> None:
  """The sample counts, --steps and --nll_timesteps against the run's T = config.diffusion.num_timesteps."""
  num_timesteps = config.diffusion.num_timesteps
  for flag in (_NUM_SAMPLES, _BATCH_SIZE, _MAX_FEATURES):
    if flag.value < sample_eval.MIN_SAMPLES:
      raise UserError(f"--{flag.name}={flag.value} is not allowed; give an integer >= {sample_eval.MIN_SAMPLES} "
                      f"(precision/recall compares each sample with its 3 nearest neighbours)")
  _, steps = sampler_and_steps(config)
  if not 1 <= steps <= num_timesteps:
    raise UserError(f"--steps={steps} is not allowed; give an integer in [1, {num_timesteps}] "
                    f"(config.diffusion.num_timesteps={num_timesteps})")
  if not -1 <= _NLL_TIMESTEPS.value <= num_timesteps:
    raise UserError(f"--nll_timesteps={_NLL_TIMESTEPS.value} is not allowed; give -1 (skip the NLL), 0 (all "
                    f"{num_timesteps} timesteps) or K in [1, {num_timesteps}] (config.diffusion.num_timesteps)")
  if _STEP.value is not None and (_ALL_STEPS.value or _WATCH.value):
    raise UserError("--step evaluates one checkpoint; it cannot be combined with --all_steps or --watch")


def _check_writable(directory: paths.PathLike) -> None:
  if _OUT.value is not None:
    paths.ensure_writable_dir(directory, "--out directory")
    return
  try:
    paths.ensure_writable_dir(directory, "eval directory of --workdir")
  except UserError as exc:
    raise UserError(f"{exc}, or pass --out=PATH to write the metrics elsewhere") from exc


class Job:
  """The evaluation of one workdir (or export) with fixed settings, for each checkpoint it is given."""

  def __init__(self, workdir: str, config, scales: list[float], templates: list[int]):
    self.workdir, self.config = workdir, config
    self.run = inference.build_for_inference(config)
    self.settings = sample_eval.settings_for(self.run.conditioning.kind, scales, templates)
    network = _FEATURE_NETWORK.value or self.run.dataset.feature_network
    features_lib.check_images(network, self.run.dataset.image_shape)
    reference = _REFERENCE_STATS.value or f"{self.run.dataset.name}/{self.run.dataset.train_split}"
    sampler, steps = sampler_and_steps(config)
    self.fixed_settings = dict(num_samples=_NUM_SAMPLES.value, sampler=sampler, steps=steps,
                               seed=_SEED.value, feature_network=network, reference=reference,
                               nll_timesteps=_NLL_TIMESTEPS.value,
                               # Recorded resolved ('auto' → the run's own), and refused before any work.
                               nll_variance=sample_quality.resolve_model_variance(config, _NLL_VARIANCE.value))
    self.network_name = network
    # Built at the first checkpoint (loads weights, reference statistics, the eval split), with their programs.
    self.evaluator = self.nll_bound = None

  def record_path(self, step: int) -> paths.epath.Path:
    return run_files.metrics_path(self.workdir, _OUT.value, step)

  def settings_record(self, step: int) -> dict:
    s = self.fixed_settings
    return run_files.eval_settings(step, num_samples=s["num_samples"], steps=s["steps"], seed=s["seed"],
                                   nll_timesteps=s["nll_timesteps"], nll_variance=s["nll_variance"],
                                   sampler=s["sampler"], feature_network=s["feature_network"],
                                   reference=s["reference"])

  def _fd_name(self) -> str:
    return "fid" if self.network_name == "inception" else "fd"

  def is_done(self, step: int) -> bool:
    """Whether `step`'s record already holds every metric these settings would write."""
    try:
      old = run_files.read_record(self.record_path(step))
    except UserError:
      return False
    if not old or run_files.changed_settings(old, self.settings_record(step)):
      return False
    return all(sample_eval.metric_key(self._fd_name(), s) in old for s in self.settings)

  def check_record(self, step: int) -> dict | None:
    """The record to add to (None: a new file); refuses one written with other settings."""
    path = self.record_path(step)
    old = None if _OVERWRITE.value else run_files.read_record(path)
    changed = run_files.changed_settings(old or {}, self.settings_record(step))
    if changed:
      differences = ", ".join(f"{k} ({old_value!r} there, {new_value!r} now)"
                              for k, (old_value, new_value) in changed.items())
      raise UserError(f"{str(path)!r} holds metrics of other settings: {differences}; pass the same settings to add "
                      f"to it, --overwrite to replace it, or --out=PATH to write elsewhere")
    return old

  def _prepare(self) -> list[concurrent.futures.Future]:
    """Builds the evaluator and the NLL bound, and starts compiling their programs on two other threads
    (futures returned): each compile keeps one core busy, and they took 8 + 17 + 14 s one after another
    at digits, with the other core idle."""
    # Parameters as load_params returns them: on the host (the evaluator replicates them on the mesh).
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                            self.run.abstract_state(replicate_indivisible=True).ema_params)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="compile_eval")
    futures = []
    if _NLL_TIMESTEPS.value >= 0:
      self.nll_bound = sample_quality.NllBound(self.run, num_timesteps=_NLL_TIMESTEPS.value or None,
                                               model_variance=self.fixed_settings["nll_variance"], seed=_SEED.value)
      futures.append(pool.submit(self.nll_bound.compile, abstract))
    options = generation.sampler_options(self.config, sampler=self.fixed_settings["sampler"],
                                         num_steps=self.fixed_settings["steps"])
    self.evaluator = sample_eval.create_evaluator(
        self.run, feature_network=self.network_name, inception_weights=_INCEPTION_WEIGHTS.value,
        cache=_CACHE_DIR.value, num_samples=_NUM_SAMPLES.value, batch_size=_BATCH_SIZE.value, options=options,
        seed=_SEED.value, reference_stats=_REFERENCE_STATS.value, max_features=_MAX_FEATURES.value,
        negative_prompt=self.config.sampling.negative_prompt)
    futures += [pool.submit(c) for c in self.evaluator.compile(abstract, self.settings)]
    pool.shutdown(wait=False)
    return futures

  def evaluate(self, step: int | None) -> dict:
    """Evaluates checkpoint `step` (None: the newest good one); writes and returns its record."""
    compiling = self._prepare() if self.evaluator is None else []
    params, step = inference.load_params(self.run, self.workdir, step)
    if compiling:
      # Meanwhile, on this thread: TensorFlow (~7 s of imports), which the TensorBoard writer needs at the end.
      importlib.import_module("diffusion_jax.metrics.writers")
      for future in compiling:
        future.result()  # Raises what the compile raised.
    old = self.check_record(step)
    logging.info("Evaluating step %d: %d samples for each of %d settings.", step, _NUM_SAMPLES.value,
                 len(self.settings))
    results = self.evaluator.evaluate(params, self.settings)
    metrics = {k: v for r in results for k, v in r.metrics.items()}
    if self.evaluator.classifier_test_accuracy is not None:
      metrics["classifier_test_accuracy"] = self.evaluator.classifier_test_accuracy
    if self.nll_bound is not None:
      metrics.update(self.nll_bound(params))
    record = run_files.merge_records(old or {}, {**self.settings_record(step), **metrics})
    if jax.process_index() == 0:
      self._write(step, record, results, metrics)
    return record

  def _write(self, step: int, record: dict, results, metrics: dict) -> None:
    path = self.record_path(step)
    directory = path.parent
    run_files.write_record(path, record)
    for result in results:
      name = result.setting.name.replace("/", "_") or "samples"
      images.save_grid(directory / f"{step}_{name}.png", result.grid, num_rows=result.grid_rows)
    plot = self._plot_sweep(step, record, directory / f"{step}_sweep.png")
    from diffusion_jax.metrics import writers as metric_writers  # pylint: disable=g-import-not-at-top  (TF)
    writer = metric_writers.create_writer(directory)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    writer.flush()
    for name, value in metrics.items():
      logging.info("step %d: %s = %.4f", step, name, value)
    print(json.dumps(record, indent=2))
    print(f"metrics: {path}" + (f"\nsweep plot: {plot}" if plot else ""))

  def _plot_sweep(self, step: int, record: dict, path: paths.epath.Path) -> paths.epath.Path | None:
    """The sweep of every scale the record holds (this run's and earlier ones'), for the first template."""
    template = self.settings[0].template
    scales = sorted(s for s in _recorded_scales(record, self._fd_name(), template))
    if len(scales) < 2:
      return None
    key = lambda metric, scale: sample_eval.metric_key(metric, sample_eval.Setting(scale, template))
    others = {m: [record.get(key(m, s)) for s in scales] for m in ("precision", "recall", "accuracy")}
    others = {m: v for m, v in others.items() if all(x is not None for x in v)}
    title = f"{self.run.dataset.name}, step {step}, {record['num_samples']} samples per scale"
    return sweep_plot.plot_guidance_sweep(path, scales, [record[key(self._fd_name(), s)] for s in scales], others,
                                          fd_name=self._fd_name(), title=title)


def _recorded_scales(record: dict, fd_name: str, template: int | None) -> list[float]:
  prefix = f"{fd_name}/" + ("" if template is None else f"template_{template}/") + "guidance_"
  return [float(k[len(prefix):]) for k in record if k.startswith(prefix)]


def _evaluate_unless_gone(job: Job, step: int) -> None:
  try:
    job.evaluate(step)
  except UserError as exc:  # E.g. removed by the run's checkpoint rotation while we looked.
    logging.warning("Skipping step %d: %s", step, exc)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  # Every flag and the output directory are checked before the model loads.
  scales = parse_scales(_SCALES.value)
  config = inference.read_config(_WORKDIR.value)
  dataset = registry.get(config.dataset.name)
  templates = _parse_templates(_TEMPLATES.value, dataset.num_caption_templates)
  _check_counts(config)
  _check_writable(run_files.metrics_path(_WORKDIR.value, _OUT.value, step=0).parent)
  steps = inference.checkpoint_steps(_WORKDIR.value)
  if not steps and not _WATCH.value:
    raise UserError(f"no checkpoint in {_WORKDIR.value!r}; train first (or pass --watch to wait for one)")
  job = Job(_WORKDIR.value, config, scales, templates)
  if _ALL_STEPS.value or _WATCH.value:
    inference.follow_checkpoints(_WORKDIR.value, config.num_train_steps, is_done=job.is_done,
                                 evaluate=lambda step: _evaluate_unless_gone(job, step), follow=_WATCH.value,
                                 poll_seconds=_POLL_SECONDS.value, timeout=_WATCH_TIMEOUT.value)
  else:
    job.evaluate(_STEP.value)


if __name__ == "__main__":
  cli.run(main)
