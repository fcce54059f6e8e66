"""train_and_evaluate(config, workdir): the training loop, nothing else."""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import periodic_actions

from diffusion_jax import config as config_lib
from diffusion_jax import images as images_lib
from diffusion_jax import held_out_loss, metric_writers, paths, preemption, sampling, train_state, workdir_lock
from diffusion_jax.checkpoint import Checkpointer, checkpoint_dir
from diffusion_jax.data import pipeline
from diffusion_jax.data.builders import digits
from diffusion_jax.diffusion import losses, schedules
from diffusion_jax.errors import Interrupted, NonFiniteError, UserError
from diffusion_jax.models.tokenizer import ByteTokenizer
from diffusion_jax.models.unet import TextToImageModel, create_model
from diffusion_jax.parallel import mesh as mesh_lib


def train_step(state: train_state.TrainState, batch: dict[str, jax.Array], *, model: TextToImageModel,
               tx: optax.GradientTransformation, schedule: schedules.NoiseSchedule, config,
               empty_tokens: jax.Array) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch {'image': uint8 [B, H, W, C], 'tokens': int32 [B, L]}.

  Captions are replaced by the empty prompt with probability p_uncond (classifier-free guidance
  training); the loss is the (weighted) MSE of the parameterization's target at one random t per
  example. With gradient_accumulation_steps = k the batch is processed as k micro-batches whose
  gradients are averaged; all randomness is drawn for the whole batch first, so the step equals the
  k = 1 step up to float summation order.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  drop_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  x0 = images_lib.to_model_range(batch["image"])
  keep = jax.random.uniform(drop_rng, (x0.shape[0],)) >= config.diffusion.p_uncond
  inputs = {
      "x0": x0,
      "tokens": jnp.where(keep[:, None], batch["tokens"], empty_tokens[None, :]),
  }
  inputs["t"], inputs["noise"] = losses.draw_timesteps_and_noise(noise_rng, x0, schedule.num_timesteps)

  def loss_fn(params, micro, micro_index):
    predict = lambda x_t, t: model.apply({"params": params}, x_t, t, micro["tokens"], train=True,
                                         rngs={"dropout": jax.random.fold_in(dropout_rng, micro_index)})
    return jnp.mean(losses.per_example_loss(
        predict, micro["x0"], micro["t"], micro["noise"], schedule, config.diffusion.prediction_type,
        weighting=config.diffusion.loss_weighting, min_snr_gamma=config.diffusion.min_snr_gamma))

  k = config.gradient_accumulation_steps
  grad_fn = jax.value_and_grad(loss_fn)
  if k == 1:
    loss, grads = grad_fn(state.params, inputs, 0)
  else:
    # Micro-batch j takes rows j, j + k, j + 2k, …: each device's rows are spread evenly over the
    # micro-batches, so a batch sharded over (data, fsdp) needs no resharding.
    micro_batches = jax.tree.map(lambda a: a.reshape((a.shape[0] // k, k) + a.shape[1:]).swapaxes(0, 1), inputs)

    def accumulate(carry, xs):
      micro, index = xs
      loss, grads = grad_fn(state.params, micro, index)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(k)))
    loss, grads = jax.tree.map(lambda a: a / k, (loss, grads))

  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # EMA with the usual warm-up, so early EMA weights are not dominated by the initialization.
  decay = jnp.minimum(config.optimizer.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - decay)
  # A finite loss and gradient can still give non-finite parameters (a NaN learning rate, an optimizer
  # state that overflowed), so the guard also looks at what would be kept: the update and the new
  # parameters (the EMA of finite parameters is finite). Norms, not per-leaf checks: one fused
  # reduction each (900 separate per-leaf reductions made the CPU compile 10× slower).
  update_norm = optax.global_norm(updates)
  param_norm = optax.global_norm(params)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm) & jnp.isfinite(param_norm)
  # A step with a non-finite loss, gradient or result changes nothing but the counters: the batch is
  # consumed (the data position and RNG stream stay those of an uninterrupted run) and skipped.
  keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  params, ema_params, opt_state = keep_if_finite((params, ema_params, opt_state),
                                                 (state.params, state.ema_params, state.opt_state))
  skipped = 1 - finite.astype(jnp.int32)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
                            nonfinite_steps=state.nonfinite_steps + skipped,
                            nonfinite_streak=(state.nonfinite_streak + 1) * skipped)
  metrics = {"loss": loss, "grad_norm": grad_norm, "update_norm": update_norm, "param_norm": param_norm,
             "skipped_nonfinite": skipped,
             "nonfinite_streak": new_state.nonfinite_streak,
             "learning_rate": train_state.learning_rate_schedule(config)(state.step)}
  return new_state, metrics


def make_train_step(config, model: TextToImageModel, tx: optax.GradientTransformation,
                    schedule: schedules.NoiseSchedule, state_shardings: Any, mesh):
  """train_step jitted with explicit shardings: state as its logical axes say, batch over (data, fsdp),
  metrics replicated; the input state's buffers are donated."""
  empty_tokens = jnp.asarray(ByteTokenizer(config.text.max_length).encode(""))
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config, empty_tokens=empty_tokens),
      in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh)),
      out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=0)


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's rows → the global batch arrays, sharded over (data, fsdp)."""
  sharding = mesh_lib.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, local[k]) for k in ("image", "tokens")}


def check_batch_divisibility(config, mesh) -> None:
  """The global batch must split evenly over processes, data-parallel devices and micro-batches."""
  dp, k = mesh_lib.data_parallel_size(mesh), config.gradient_accumulation_steps
  if config.batch_size % dp:
    raise UserError(f"batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
                    f"(mesh data × fsdp of {dict(mesh.shape)})")
  if (config.batch_size // dp) % k:
    raise UserError(f"batch_size={config.batch_size} gives {config.batch_size // dp} examples per "
                    f"data-parallel device, not divisible by gradient_accumulation_steps={k}")


def canonical_prompts(config) -> list[str]:
  if config.sampling.prompts:
    return sampling.parse_prompts(config.sampling.prompts)
  return [digits.caption_for(d) for d in range(10)]


# Keys that may change between a run and its resumption: they change logging, the mesh, memory use or
# the length of the run, not the function the remaining steps compute (gradient accumulation changes
# only the float summation order).
RESUME_SAFE_KEYS = ("num_train_steps", "log_every_steps", "checkpoint_every_steps", "sample_every_steps",
                    "max_checkpoints_to_keep", "keep_best_checkpoints", "max_consecutive_nonfinite_steps",
                    "gradient_accumulation_steps", "eval_num_examples", "dataset.data_dir",
                    "model.remat_policy", "mesh.", "sampling.")


def _same_value(a: Any, b: Any) -> bool:
  """Equality where NaN equals NaN (a config saved with NaN must not read as changed from itself)."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
    return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
  return a == b


def check_resumable(config, workdir: str) -> None:
  """Raises UserError when `workdir` holds checkpoints of a run whose config differs from `config` in
  keys that would make the resumed run silently different (model, data, optimizer, diffusion, seed)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path) or not os.path.isdir(checkpoint_dir(workdir)) or not os.listdir(checkpoint_dir(workdir)):
    return
  with open(path, encoding="utf-8") as f:
    old = config_lib.flatten(config_lib.with_defaults(config_lib.from_json(f.read())))
  new = config_lib.flatten(config)
  changed = {k: (old.get(k), v) for k, v in new.items() if not _same_value(old.get(k), v)}
  breaking = {k: d for k, d in changed.items() if not k.startswith(RESUME_SAFE_KEYS)}
  if breaking:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(breaking.items()))
    raise UserError(f"{workdir} holds checkpoints of a run with a different config, which would not resume "
                    f"the same run: {listed}. Use a new --workdir, or pass the old values")
  if changed:
    logging.warning("Resuming with changed settings: %s", {k: f"{a!r} -> {b!r}" for k, (a, b) in changed.items()})
  if "num_train_steps" in changed and config.optimizer.schedule == "cosine":
    logging.warning("num_train_steps changed: the cosine learning-rate schedule now decays over %d steps.",
                    config.num_train_steps)


def write_config(config, workdir: str) -> None:
  """Writes workdir/config.json atomically."""
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config_lib.to_json(config))
  os.replace(tmp, path)


def train_and_evaluate(config, workdir: str) -> train_state.TrainState:
  """Trains (resuming from the latest good checkpoint in `workdir`), logging, sampling and checkpointing.

  On SIGTERM it saves at the end of the current step and returns; steps with a non-finite loss or
  gradient are skipped, and NonFiniteError stops the run after too many in a row.
  """
  config_lib.validate(config)
  workdir = paths.ensure_writable_dir(workdir, "--workdir")
  with workdir_lock.hold(workdir), preemption.PreemptionWatcher() as preempt:
    return _train_and_evaluate(config, workdir, preempt)


def _train_and_evaluate(config, workdir: str, preempt: preemption.PreemptionWatcher) -> train_state.TrainState:
  """train_and_evaluate once the config is valid and this run owns the writable `workdir`."""
  check_resumable(config, workdir)
  is_main = jax.process_index() == 0
  if is_main:
    write_config(config, workdir)

  mesh = mesh_lib.create_mesh(config.mesh.shape)
  rules = mesh_lib.logical_rules(config)
  check_batch_divisibility(config, mesh)
  model = create_model(config)
  tx = train_state.create_optimizer(config)
  schedule = schedules.schedule_from_config(config)
  tokenizer = ByteTokenizer(config.text.max_length)

  train_iter = pipeline.create_train_iterator(config)
  checkpointer = Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep,
                              keep_best=config.keep_best_checkpoints, best_metric="eval_loss")
  abstract = train_state.abstract_train_state(model, tx, mesh, rules, config.mesh.replicate_indivisible)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  restored_step, state = checkpointer.restore_latest_good(
      lambda step: checkpointer.restore(step, abstract, train_iter))
  if state is None:
    state, _ = train_state.create_train_state(jax.random.PRNGKey(config.seed), model, tx, mesh, rules,
                                              config.mesh.replicate_indivisible)
  else:
    logging.info("Resuming at step %d.", restored_step)
  logging.info("Model: %s parameters (%s text encoder).", f"{train_state.param_count(state.params):,}",
               f"{train_state.param_count(state.params['text_encoder']):,}")
  initial_step = int(jax.device_get(state.step))

  step_fn = make_train_step(config, model, tx, schedule, shardings, mesh)
  sample_fn = sampling.make_sample_fn(model, schedule, sampling.sampler_options(config))
  prompts = [p for p in canonical_prompts(config) for _ in range(config.sampling.num_per_prompt)]
  eval_loss = held_out_loss.make_held_out_loss(config, model, schedule, mesh,
                                               held_out_loss.load_examples(config, config.eval_num_examples))

  writer = metric_writers.create_writer(workdir, drop_steps_after=initial_step)
  if initial_step == 0:
    writer.write_hparams({k: v for k, v in config_lib.flatten(config).items()
                          if isinstance(v, (int, float, str, bool))})
  progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer,
                                             every_steps=config.log_every_steps)
  pending_metrics: list[dict[str, jax.Array]] = []  # Since the last log line, one per step.
  logging.info("Training from step %d to %d.", initial_step, config.num_train_steps)
  stop = False
  try:
    if preempt.requested():  # Interrupted while compiling or restoring: nothing new to save.
      raise Interrupted(f"interrupted before the first step; the workdir is as it was ({workdir})")
    with mesh_lib.activate(mesh, rules):
      for step in range(initial_step + 1, config.num_train_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = step_fn(state, global_batch(next(train_iter), mesh))
        pending_metrics.append(metrics)
        checkpointer.check_for_errors()  # A failed background save (disk full) stops the run now.
        progress(step)
        last = step == config.num_train_steps
        stop = preempt.reached(step)

        if step % config.log_every_steps == 0 or last or stop:
          summary = summarize(jax.device_get(pending_metrics), step, config, checkpointer.latest_step())
          pending_metrics.clear()
          writer.write_scalars(step, summary)
          logging.info("step %d/%d: loss %.4f, grad_norm %.3f%s", step, config.num_train_steps, summary["loss"],
                       summary["grad_norm"], f", {summary['skipped_nonfinite']:.0f} non-finite steps skipped"
                       if summary["skipped_nonfinite"] else "")

        if step % config.sample_every_steps == 0 or last:
          images = sampling.generate(sample_fn, state.ema_params, tokenizer, prompts,
                                     config.sampling.guidance_scale, config.seed, config.sampling.negative_prompt)
          grid = images_lib.make_grid(images_lib.to_uint8(images), num_rows=len(prompts) //
                                      config.sampling.num_per_prompt, upscale=4)
          if is_main:
            images_lib.save_png(os.path.join(workdir, "samples", f"step_{step}.png"), grid)
            writer.write_images(step, {"samples": grid[None]})

        if step % config.checkpoint_every_steps == 0 or last or stop:
          # Never save inside a run of non-finite steps that must stop the run.
          summarize(jax.device_get(pending_metrics), step, config, checkpointer.latest_step())
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


def summarize(metrics: list[dict[str, np.ndarray]], step: int, config, last_checkpoint: int | None) -> dict[str, float]:
  """Averages the per-step metrics of steps (step − len(metrics), step]; sums the skipped steps.

  Raises NonFiniteError when `config.max_consecutive_nonfinite_steps` steps in a row were skipped.
  """
  if not metrics:
    return {}
  streaks = [int(m["nonfinite_streak"]) for m in metrics]
  limit = config.max_consecutive_nonfinite_steps
  if max(streaks) >= limit:
    at = step - len(metrics) + 1 + next(i for i, s in enumerate(streaks) if s >= limit)
    kept = f"step {last_checkpoint}" if last_checkpoint is not None else "none yet"
    raise NonFiniteError(
        f"{limit} consecutive steps ({at - limit + 1} to {at}) had a non-finite loss or gradient and were "
        f"skipped (max_consecutive_nonfinite_steps={limit}); stopping. The last checkpoint ({kept}) is left "
        f"as it was. Lower optimizer.learning_rate or optimizer.grad_clip_norm, or check the data, and rerun.")
  finite = [m for m in metrics if not m["skipped_nonfinite"]]
  summary = {k: float(np.mean([m[k] for m in finite])) if finite else float("nan")
             for k in metrics[0] if k not in ("skipped_nonfinite", "nonfinite_streak")}
  summary["skipped_nonfinite"] = float(sum(int(m["skipped_nonfinite"]) for m in metrics))
  return summary
