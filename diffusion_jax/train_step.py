"""The pure training step, jitted with shardings: (state, global batch) → (state, metrics).

Importable without the input pipeline's packages (grain, TFDS, TensorFlow) or clu, so it runs on a
machine that has only jax, flax and optax.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import compiler, parameter_update, train_state
from diffusion_jax.diffusion import losses, schedules
from diffusion_jax.errors import UserError
from diffusion_jax.models import conditioning as conditioning_lib
from diffusion_jax.models.diffusion_model import DiffusionModel
from diffusion_jax.parallel import mesh as mesh_lib


def example_losses(model: DiffusionModel, params: Any, inputs: dict[str, Any], schedule: schedules.NoiseSchedule,
                   config, *, train: bool = False, dropout_rng: jax.Array | None = None) -> jax.Array:
  """The training objective per example: float32 [B] (L_simple, or improved DDPM's L_hybrid with
  diffusion.learn_sigma; see `losses.per_example_loss`).

  inputs: {'x0' [B, H, W, C] in model space, 'cond' (conditioning inputs), 't' int32 [B], 'noise' [B, H, W, C]}.
  The one place the loss is called (the train step and the held-out eval_loss).
  """
  rngs = {"dropout": dropout_rng} if train else None
  predict = lambda x_t, t: model.apply({"params": params}, x_t, t, inputs["cond"], train=train, rngs=rngs)
  return losses.per_example_loss(predict, inputs["x0"], inputs["t"], inputs["noise"], schedule,
                                 config.diffusion.prediction_type, weighting=config.diffusion.loss_weighting,
                                 min_snr_gamma=config.diffusion.min_snr_gamma,
                                 learn_sigma=config.diffusion.learn_sigma, vlb_weight=config.diffusion.vlb_weight)


def train_step(state: train_state.TrainState, batch: dict[str, jax.Array], *, model: DiffusionModel,
               tx: optax.GradientTransformation, schedule: schedules.NoiseSchedule, config, autoencoder,
               null_inputs: dict[str, jax.Array]) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch {'image': uint8 [B, H, W, C], + the conditioning inputs
  ('tokens' int32 [B, L] or 'label' int32 [B])}.

  The images are encoded by `autoencoder` (pixels: mapped to [-1, 1]; kl: a draw of the latent). The conditioning inputs are
  replaced by `null_inputs` (each leaf [1, …]: the empty prompt, the null label) with probability p_uncond
  (classifier-free guidance training). The loss is the (weighted) MSE of the parameterization's target
  at one random t per example. With gradient_accumulation_steps = k the batch is processed as k
  micro-batches whose gradients are averaged; all randomness is drawn for the whole batch first, so the
  step equals the k = 1 step up to float summation order.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  drop_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  # Outside the differentiated loss: a latent autoencoder is frozen (its posterior draw has its own key).
  x0 = autoencoder.encode(state.params, batch["image"], jax.random.fold_in(rng, 3))
  keep = jax.random.uniform(drop_rng, (x0.shape[0],)) >= config.diffusion.p_uncond
  cond_inputs = {k: batch[k] for k in null_inputs}
  inputs = {"x0": x0, "cond": conditioning_lib.drop_to_null(cond_inputs, null_inputs, keep)}
  inputs["t"], inputs["noise"] = losses.draw_timesteps_and_noise(noise_rng, x0, schedule.num_timesteps)

  def loss_fn(params, micro, micro_index):
    return jnp.mean(example_losses(model, params, micro, schedule, config, train=True,
                                   dropout_rng=jax.random.fold_in(dropout_rng, micro_index)))

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

  grad_norm = optax.tree.norm(grads)
  # A step with a non-finite loss or gradient changes nothing but the counters: the batch is consumed (the
  # data position and RNG stream stay those of an uninterrupted run) and skipped. Decided before the
  # update, so XLA fuses the keep-or-skip select into the optimizer's and the EMA's per-parameter loops.
  # AdamW turns finite gradients into a finite update; a non-finite one (a NaN learning rate) is caught on
  # the host at the next log line from the parameters' norm (train.summarize), and the checkpointer never
  # saves a non-finite state. The step itself returns no norm of its updated parameters or of the update:
  # on a CPU (no multi-output fusion) each such reduction recomputes the whole update from the parameters,
  # gradients and both moments: the two norms were 30% of the medium benchmark step's fusions (see README, Benchmarks).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # EMA with the usual warm-up, so early EMA weights are not dominated by the initialization.
  decay = jnp.minimum(config.optimizer.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  params, ema_params, opt_state = parameter_update.update(tx, grads, state.opt_state, state.params, state.ema_params,
                                                          grad_norm=grad_norm, ema_decay=decay, finite=finite)
  skipped = 1 - finite.astype(jnp.int32)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
                            nonfinite_steps=state.nonfinite_steps + skipped,
                            nonfinite_streak=(state.nonfinite_streak + 1) * skipped)
  metrics = {"loss": loss, "grad_norm": grad_norm, "skipped_nonfinite": skipped,
             "nonfinite_streak": new_state.nonfinite_streak,
             "learning_rate": train_state.learning_rate_schedule(config)(state.step)}
  return new_state, metrics


def make_train_step(run, state_shardings: Any):
  """train_step of a `build.Run`, jitted with explicit shardings: state as its logical axes say, batch over
  (data, fsdp), metrics replicated; the input state's buffers are donated, except on a CPU
  (`compiler.donates_state`)."""
  null_inputs = jax.tree.map(jnp.asarray, run.conditioning.null_inputs(1))
  step = functools.partial(train_step, model=run.model, tx=run.optimizer, schedule=run.schedule,
                           config=run.config, autoencoder=run.autoencoder, null_inputs=null_inputs)
  return compiler.jit(step, in_shardings=(state_shardings, mesh_lib.batch_sharding(run.mesh)),
                      out_shardings=(state_shardings, mesh_lib.replicated(run.mesh)),
                      donate_argnums=0 if compiler.donates_state() else ())


def global_batch(local: dict[str, np.ndarray], mesh, keys: tuple[str, ...]) -> dict[str, jax.Array]:
  """This process's rows of `keys` ('image' and the conditioning inputs) → the global batch arrays,
  sharded over (data, fsdp)."""
  sharding = mesh_lib.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, local[k]) for k in keys}


def abstract_global_batch(run) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch as the input pipeline delivers it, as shapes, dtypes and shardings: 'image' uint8
  [B, S, S, C] of config.dataset's size and channels, plus the conditioning inputs. For compiling the
  step before any data is read."""
  config, sharding = run.config, mesh_lib.batch_sharding(run.mesh)
  size, b = config.dataset.image_size, config.batch_size
  batch = {"image": jax.ShapeDtypeStruct((b, size, size, config.dataset.channels), jnp.uint8, sharding=sharding)}
  batch.update({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                for k, v in run.conditioning.null_inputs(b).items()})
  return batch


def check_batch_divisibility(config, mesh) -> None:
  """The global batch must split evenly over processes, data-parallel devices and micro-batches."""
  dp, k = mesh_lib.data_parallel_size(mesh), config.gradient_accumulation_steps
  if config.batch_size % dp:
    raise UserError(f"batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
                    f"(mesh data × fsdp of {dict(mesh.shape)})")
  if (config.batch_size // dp) % k:
    raise UserError(f"batch_size={config.batch_size} gives {config.batch_size // dp} examples per "
                    f"data-parallel device, not divisible by gradient_accumulation_steps={k}")
