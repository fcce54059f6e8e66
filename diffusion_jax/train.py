"""train_and_evaluate(config, workdir): the training loop, nothing else."""

from __future__ import annotations

import functools
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
from diffusion_jax import metric_writers, sampling, train_state
from diffusion_jax.checkpoint import Checkpointer
from diffusion_jax.data import pipeline
from diffusion_jax.data.builders import digits
from diffusion_jax.diffusion import losses, schedules
from diffusion_jax.errors import UserError
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

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # EMA with the usual warm-up, so early EMA weights are not dominated by the initialization.
  decay = jnp.minimum(config.optimizer.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - decay)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
             "learning_rate": train_state.learning_rate_schedule(config)(state.step)}
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
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


def write_config(config, workdir: str) -> None:
  """Writes workdir/config.json; warns about keys that differ from a previous run in this workdir."""
  path = os.path.join(workdir, "config.json")
  text = config_lib.to_json(config)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = config_lib.from_json(f.read())
    changed = sorted(k for k, v in config_lib.flatten(config).items()
                     if config_lib.flatten(old).get(k) != v)
    if changed:
      logging.warning("Config differs from the previous run in %s: %s", workdir, changed)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def train_and_evaluate(config, workdir: str) -> train_state.TrainState:
  """Trains (resuming from the latest checkpoint in `workdir`), logging, sampling and checkpointing."""
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    write_config(config, workdir)

  mesh = mesh_lib.create_mesh(config.mesh.shape)
  rules = mesh_lib.logical_rules(config)
  check_batch_divisibility(config, mesh)
  model = create_model(config)
  tx = train_state.create_optimizer(config)
  schedule = schedules.schedule_from_config(config)
  tokenizer = ByteTokenizer(config.text.max_length)

  train_iter = pipeline.create_train_iterator(config)
  state, shardings = train_state.create_train_state(jax.random.PRNGKey(config.seed), model, tx, mesh, rules,
                                                    config.mesh.replicate_indivisible)
  logging.info("Model: %s parameters (%s text encoder).", f"{train_state.param_count(state.params):,}",
               f"{train_state.param_count(state.params['text_encoder']):,}")
  checkpointer = Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep)
  latest = checkpointer.latest_step()
  if latest is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    state = checkpointer.restore(latest, abstract, train_iter)
    logging.info("Resuming at step %d.", latest)
  initial_step = int(jax.device_get(state.step))

  step_fn = make_train_step(config, model, tx, schedule, shardings, mesh)
  sample_fn = sampling.make_sample_fn(model, schedule, sampling.sampler_options(config))
  prompts = [p for p in canonical_prompts(config) for _ in range(config.sampling.num_per_prompt)]

  writer = metric_writers.create_writer(workdir)
  if initial_step == 0:
    writer.write_hparams({k: v for k, v in config_lib.flatten(config).items()
                          if isinstance(v, (int, float, str, bool))})
  progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer,
                                             every_steps=config.log_every_steps)
  pending_metrics: list[dict[str, jax.Array]] = []
  logging.info("Training from step %d to %d.", initial_step, config.num_train_steps)
  with mesh_lib.activate(mesh, rules):
    for step in range(initial_step + 1, config.num_train_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = step_fn(state, global_batch(next(train_iter), mesh))
      pending_metrics.append(metrics)
      progress(step)

      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        summary = {k: float(np.mean([m[k] for m in jax.device_get(pending_metrics)])) for k in metrics}
        pending_metrics.clear()
        if not np.isfinite(summary["loss"]):
          raise FloatingPointError(f"loss is {summary['loss']} at step {step}")
        writer.write_scalars(step, summary)
        logging.info("step %d/%d: loss %.4f, grad_norm %.3f", step, config.num_train_steps,
                     summary["loss"], summary["grad_norm"])

      if step % config.sample_every_steps == 0 or step == config.num_train_steps:
        images = sampling.generate(sample_fn, state.ema_params, tokenizer, prompts,
                                   config.sampling.guidance_scale, config.seed, config.sampling.negative_prompt)
        grid = images_lib.make_grid(images_lib.to_uint8(images), num_rows=len(prompts) //
                                    config.sampling.num_per_prompt, upscale=4)
        if is_main:
          images_lib.save_png(os.path.join(workdir, "samples", f"step_{step}.png"), grid)
          writer.write_images(step, {"samples": grid[None]})

      if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
        checkpointer.save(step, state, train_iter, config.to_dict())

  checkpointer.wait()
  checkpointer.close()
  writer.flush()
  return state
