"""train_and_evaluate(config, workdir): the training loop, nothing else."""

from __future__ import annotations

import concurrent.futures

import jax
import numpy as np
import optax
from absl import logging
from clu import periodic_actions

from diffusion_jax import build as build_lib
from diffusion_jax import config as config_lib
from diffusion_jax import images as images_lib
from diffusion_jax import compiler, generation, memory_fit, paths, preemption, run_files, train_state
from diffusion_jax import workdir_lock
from diffusion_jax.checkpoint import Checkpointer
from diffusion_jax.data import pipeline
from diffusion_jax.errors import Interrupted, NonFiniteError
from diffusion_jax.metrics import held_out_loss, sample_eval
from diffusion_jax.metrics import writers as metric_writers
from diffusion_jax.parallel import mesh as mesh_lib
from diffusion_jax.train_step import check_batch_divisibility, global_batch


def train_and_evaluate(config, workdir: paths.PathLike) -> train_state.TrainState:
  """Trains (resuming from the latest good checkpoint in `workdir`, a local path or a URL such as
  gs://bucket/run), logging, sampling and checkpointing.

  On SIGTERM it saves at the end of the current step and returns; steps with a non-finite loss or
  gradient are skipped, and NonFiniteError stops the run after too many in a row, or after a non-finite
  update (see `summarize`).
  """
  config_lib.validate(config)
  workdir = paths.ensure_writable_dir(workdir, "--workdir")
  with workdir_lock.hold(workdir), preemption.PreemptionWatcher() as preempt:
    return _train_and_evaluate(config, workdir, preempt)


def _train_and_evaluate(config, workdir: paths.epath.Path, preempt: preemption.PreemptionWatcher) -> train_state.TrainState:
  """train_and_evaluate once the config is valid and this run owns the writable `workdir`."""
  run_files.check_resumable(config, workdir)
  is_main = jax.process_index() == 0
  if is_main:
    run_files.write_config(config, workdir)

  run = build_lib.build(config)
  check_batch_divisibility(config, run.mesh)
  log_topology(run.mesh, workdir)
  abstract = run.abstract_state()
  step_compiled = compile_in_background(run, abstract)
  # The parameters' global norm, read at each log line and before each checkpoint (see `summarize`):
  # compiled here, beside the step (~2 s on a CPU at digits), rather than at the first log line.
  param_norm_of = compiler.jit(optax.tree.norm, out_shardings=mesh_lib.replicated(run.mesh)).lower(
      abstract.params).compile()
  tokenizer = getattr(run.conditioning, "tokenizer", None)
  train_iter = pipeline.create_train_iterator(config, tokenizer=tokenizer)
  batch_keys = ("image",) + tuple(run.conditioning.input_keys)
  checkpointer = Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep,
                              keep_best=config.keep_best_checkpoints, best_metric="eval_loss")
  restored_step, state = checkpointer.restore_latest_good(
      lambda step: checkpointer.restore(step, abstract, train_iter))
  if state is None:
    state, _ = run.create_state(jax.random.PRNGKey(config.seed))
  else:
    logging.info("Resuming at step %d.", restored_step)
  logging.info("Model: %s parameters (%s).", f"{train_state.param_count(state.params):,}",
               ", ".join(f"{name} {train_state.param_count(p):,}" for name, p in state.params.items()))
  initial_step = int(jax.device_get(state.step))

  sample_fn = generation.make_sample_fn(run.model, run.schedule, generation.sampler_options(config), run.autoencoder)
  rows = generation.grid_requests(config, run.dataset, run.conditioning.kind)
  requests = [r for r in rows for _ in range(config.sampling.num_per_prompt)]
  eval_loss = held_out_loss.make_held_out_loss(run, held_out_loss.load_examples(run, config.eval_num_examples))
  sample_evaluator, eval_settings = _create_sample_evaluator(run)

  writer = metric_writers.create_writer(workdir, drop_steps_after=initial_step)
  if initial_step == 0:
    writer.write_hparams({k: v for k, v in config_lib.flatten(config).items()
                          if isinstance(v, (int, float, str, bool))})
  progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer,
                                             every_steps=config.log_every_steps)
  pending_metrics: list[dict[str, jax.Array]] = []  # Since the last log line, one per step.
  if not step_compiled.done():
    # This thread would only wait for the train step's compilation: compile the grid sampler and the
    # held-out loss meanwhile, on the other core, instead of at the first grid and checkpoint.
    with mesh_lib.activate(run.mesh, run.rules):
      generation.compile_generate(sample_fn, abstract.ema_params, run.conditioning, requests,
                                  config.sampling.negative_prompt)
      eval_loss.compile(abstract.ema_params)
  step_fn, fit = step_compiled.result()  # Raises what the compilation raised.
  if fit.gradient_accumulation_steps != config.gradient_accumulation_steps:
    logging.info("auto_gradient_accumulation: the batch of %d runs as %d micro-batches (configured: %d), "
                 "the fewest whose step fits the devices' memory.", config.batch_size,
                 fit.gradient_accumulation_steps, config.gradient_accumulation_steps)
  logging.info("Training from step %d to %d.", initial_step, config.num_train_steps)
  stop = False
  try:
    if preempt.requested():  # Interrupted while compiling or restoring: nothing new to save.
      raise Interrupted(f"interrupted before the first step; the workdir is as it was ({workdir})")
    with mesh_lib.activate(run.mesh, run.rules):
      for step in range(initial_step + 1, config.num_train_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = step_fn(state, global_batch(next(train_iter), run.mesh, batch_keys))
        pending_metrics.append(metrics)
        if jax.process_count() == 1 or step % config.log_every_steps == 0:
          checkpointer.check_for_errors()  # A failed background save (disk full) stops the run now.
        progress(step)
        last = step == config.num_train_steps
        stop = preempt.reached(step)

        if step % config.log_every_steps == 0 or last or stop:
          summary = summarize(jax.device_get(pending_metrics), step, config, checkpointer.latest_step(),
                              float(jax.device_get(param_norm_of(state.params))))
          pending_metrics.clear()
          writer.write_scalars(step, summary)
          logging.info("step %d/%d: loss %.4f, grad_norm %.3f%s", step, config.num_train_steps, summary["loss"],
                       summary["grad_norm"], f", {summary['skipped_nonfinite']:.0f} non-finite steps skipped"
                       if summary["skipped_nonfinite"] else "")

        if step % config.sample_every_steps == 0 or last:
          images = generation.generate(sample_fn, state.ema_params, run.conditioning, requests,
                                     config.sampling.guidance_scale, config.seed, config.sampling.negative_prompt)
          if is_main:
            grid = images_lib.save_grid(workdir / "samples" / f"step_{step}.png",
                                        images_lib.to_uint8(images), num_rows=len(rows))
            writer.write_images(step, {"samples": grid[None]})

        if sample_evaluator is not None and (step % config.eval.every_steps == 0 or last):
          results = sample_evaluator.evaluate(state.ema_params, eval_settings)
          sample_metrics = {f"sample_eval/{k}": v for r in results for k, v in r.metrics.items()}
          writer.write_scalars(step, sample_metrics)
          logging.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in sample_metrics.items()))

        if step % config.checkpoint_every_steps == 0 or last or stop:
          # Never save inside a run of non-finite steps that must stop the run.
          summarize(jax.device_get(pending_metrics), step, config, checkpointer.latest_step(),
                    float(jax.device_get(param_norm_of(state.params))))
          checkpoint_metrics = {"eval_loss": eval_loss(state.ema_params)}
          writer.write_scalars(step, checkpoint_metrics)
          checkpointer.save(step, state, train_iter, config.to_dict(), checkpoint_metrics)
        if stop:
          break

  finally:  # Also after an error: let a save in flight commit, so no good checkpoint is lost.
    checkpointer.wait()
    checkpointer.close()
    writer.flush()
  if stop and step < config.num_train_steps:
    logging.warning("Stopped after %s; step %d is saved in %s. Run the same command to resume.",
                    preempt.reason(), step, checkpointer.directory)
    if preempt.interrupted_by_user():
      raise Interrupted(f"interrupted by Ctrl-C; step {step} is saved in {checkpointer.directory}. "
                        f"Run the same command to resume")
  return state


def compile_in_background(run, abstract_state) -> concurrent.futures.Future:
  """Starts compiling the train step for the state's and the global batch's shapes and shardings on
  another thread (`memory_fit.compile_train_step`: with a remat policy and micro-batch count that fit);
  returns the future of (the jitted step, its memory_fit.StepFit).

  Meanwhile this thread prepares the data and creates or restores the state. Both sides are mostly
  one-core work (XLA compiles, dataset preparation, checkpoint reads), so start-up costs about the longer
  of the two instead of their sum. jit reuses the compiled program at the first step (a batch of other
  shapes would only compile again).
  """
  shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  limit = memory_fit.agreed_device_limit(run.mesh.devices.flat)  # A collective: on this thread.
  executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile_train_step")
  future = executor.submit(memory_fit.compile_train_step, run, shardings, abstract_state, limit)
  executor.shutdown(wait=False)
  return future


def log_topology(mesh, workdir) -> None:
  """One line at start: processes, devices and the mesh, so a pod job's log says what it ran on."""
  devices = jax.devices()
  logging.info("Topology: %d process(es) (this is process %d), %d %s device(s) (%d local), mesh %s; "
               "workdir %s; process 0 writes logs, images and metrics, every process checkpoints.",
               jax.process_count(), jax.process_index(), len(devices), devices[0].device_kind,
               jax.local_device_count(), dict(mesh.shape), workdir)


def _create_sample_evaluator(run) -> tuple[sample_eval.SampleEvaluator | None, list[sample_eval.Setting]]:
  """The periodic sample-quality evaluation of config.eval (None if every_steps = 0): its feature network
  and the real data's statistics are prepared here, once, so an evaluation costs about its sampling."""
  config = run.config
  if not config.eval.every_steps:
    return None, []
  evaluator = sample_eval.create_evaluator(
      run, feature_network=config_lib.resolved_feature_network(config), inception_weights=config.eval.inception_weights,
      cache=config.eval.cache_dir, num_samples=config.eval.num_samples, batch_size=config.eval.batch_size,
      options=generation.sampler_options(config), seed=config.seed, negative_prompt=config.sampling.negative_prompt)
  scales = tuple(config.eval.guidance_scales) or (config.sampling.guidance_scale,)
  return evaluator, sample_eval.settings_for(run.conditioning.kind, scales)


def summarize(metrics: list[dict[str, np.ndarray]], step: int, config, last_checkpoint: int | None,
              param_norm: float) -> dict[str, float]:
  """Averages the per-step metrics of steps (step − len(metrics), step]; sums the skipped steps; adds
  `param_norm`, the parameters' global norm after `step`.

  Raises NonFiniteError when the parameters are non-finite, i.e. a step that was not skipped (finite loss
  and gradient) made them so with a non-finite update, or when `config.max_consecutive_nonfinite_steps`
  steps in a row were skipped.
  """
  first = step - len(metrics) + 1
  kept = f"step {last_checkpoint}" if last_checkpoint is not None else "none yet"
  if not np.isfinite(param_norm):
    # A step on non-finite parameters has a non-finite loss and is skipped, so the last step that was not
    # skipped is the one whose update made them non-finite (the previous check found them finite).
    applied = [i for i, m in enumerate(metrics) if not m["skipped_nonfinite"]]
    culprit = (f"step {first + applied[-1]} had a finite loss and gradient but its update (learning rate "
               f"{float(metrics[applied[-1]]['learning_rate'])}) made the parameters non-finite" if applied
               else "the parameters are non-finite")
    raise NonFiniteError(
        f"{culprit} (parameter norm {param_norm} at step {step}); stopping. The last checkpoint ({kept}) is "
        f"left as it was. Check optimizer.learning_rate and the optimizer's settings, and rerun.")
  if not metrics:
    return {"param_norm": param_norm}
  streaks = [int(m["nonfinite_streak"]) for m in metrics]
  limit = config.max_consecutive_nonfinite_steps
  if max(streaks) >= limit:
    at = first + next(i for i, s in enumerate(streaks) if s >= limit)
    raise NonFiniteError(
        f"{limit} consecutive steps ({at - limit + 1} to {at}) had a non-finite loss or gradient and were "
        f"skipped (max_consecutive_nonfinite_steps={limit}); stopping. The last checkpoint ({kept}) is left "
        f"as it was. Lower optimizer.learning_rate or optimizer.grad_clip_norm, or check the data, and rerun.")
  finite = [m for m in metrics if not m["skipped_nonfinite"]]
  summary = {k: float(np.mean([m[k] for m in finite])) if finite else float("nan")
             for k in metrics[0] if k not in ("skipped_nonfinite", "nonfinite_streak")}
  summary["skipped_nonfinite"] = float(sum(int(m["skipped_nonfinite"]) for m in metrics))
  summary["param_norm"] = param_norm
  return summary
