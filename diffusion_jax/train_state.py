"""TrainState and its creation directly in its sharded layout (eval_shape → shardings → jit init)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Callable
import zlib

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import optax

from diffusion_jax import compiler, parameter_update
from diffusion_jax.models import initializers
from diffusion_jax.models.diffusion_model import DiffusionModel
from diffusion_jax.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  """step: int32 [], batches consumed; params/ema_params: {'unet', conditioner}; rng: uint32 [2] root key.

  nonfinite_steps: int32 [], steps skipped because their loss or gradients were not finite;
  nonfinite_streak: int32 [], how many of the latest steps in a row were skipped.
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_steps: jax.Array
  nonfinite_streak: jax.Array


def learning_rate_schedule(config) -> optax.Schedule:
  opt = config.optimizer
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, opt.warmup_steps,
                                              max(config.num_train_steps, opt.warmup_steps + 1))
  return optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps),
                               optax.constant_schedule(opt.learning_rate)], [opt.warmup_steps])


LEARNING_RATE_SCHEDULES = ("cosine", "constant")


def adamw(config) -> optax.GradientTransformation:
  """AdamW with the config's schedule: each array updated from its own gradient, value and moments."""
  opt = config.optimizer
  return optax.adamw(learning_rate_schedule(config), b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)


def create_optimizer(config, frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """Global-norm gradient clipping, then `adamw` (its state: (clip's EmptyState, AdamW's state)). The
  top-level parameter subtrees named in `frozen` get no update and no optimizer state."""
  tx = parameter_update.clipped(config.optimizer.grad_clip_norm, adamw(config))
  if not frozen:
    return tx
  # One label per parameter; a logically partitioned parameter (nn.Partitioned box) is one parameter.
  labels = lambda params: {k: jax.tree.map(lambda _: "frozen" if k in frozen else "train", v,
                                           is_leaf=lambda x: isinstance(x, nn.Partitioned))
                           for k, v in params.items()}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _init_params(rng: jax.Array, model: DiffusionModel, counts: dict | None = None, abstract: bool = False,
                 draws: list | None = None) -> Any:
  """Boxed (nn.Partitioned) parameters: logical axis names travel with the leaves. `counts`: the pooled
  draws' counts (`initializers.recording`, as `state_shapes` records them), else counted here by one more
  trace. `abstract`: for eval_shape only (the same shapes, without pooling the random draws)."""
  init_params = lambda r: model.init(r, *model.dummy_inputs())["params"]
  return init_params(rng) if abstract else initializers.pooled(init_params, rng, counts, draws)


def _state_from_params(params: Any, rng: jax.Array, tx: optax.GradientTransformation) -> TrainState:
  """The state at step 0 around `params`: its EMA starts as a copy, the optimizer state is tx.init's."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, ema_params=params, opt_state=tx.init(params), rng=rng,
                    nonfinite_steps=zero, nonfinite_streak=zero)


def _init_state(rng: jax.Array, model: DiffusionModel, tx: optax.GradientTransformation,
                counts: dict | None = None, abstract: bool = False, draws: list | None = None) -> TrainState:
  """Boxed state (`_init_params`'s arguments)."""
  init_rng, state_rng = jax.random.split(rng)
  return _state_from_params(_init_params(init_rng, model, counts, abstract, draws), state_rng, tx)


@dataclasses.dataclass(frozen=True)
class StateShapes:
  """One abstract trace of the state's initializer: `boxed`, the TrainState as ShapeDtypeStructs boxed
  with the parameters' logical axis names (no compute), and `counts`, the pooled draws' counts recorded in
  the same trace (`initializers.recording`). A model's init is its costliest trace (1.2 s at the SD 2.1
  layout on a 2-core CPU), so a run traces it for this once and shares it (build.Run.state_shapes)."""

  boxed: Any
  counts: dict


def state_shapes(model: DiffusionModel, tx: optax.GradientTransformation) -> StateShapes:
  with initializers.recording() as counts:
    boxed = jax.eval_shape(lambda: _init_state(jax.random.PRNGKey(0), model, tx, abstract=True))
  return StateShapes(boxed, counts)


# Compiling the initializer was most of a state's creation time, nearly all of it the random draws: a
# threefry hash and an inverse-CDF transform compiled per draw. models/initializers.pooled makes one draw
# per group of alike arrays (92 kernels -> 24 draws at configs/smoke.py, 251 -> 51 at the SD 2.1 layout),
# and the draws are made on the host by numpy wherever they fit in its memory (`draw_on_host`), so that
# the compiled program only scales, copies and zeroes. On the CPU it is compiled without LLVM's
# optimizations: at sd21 on 2 cores that compile takes 2.5 s against 4.8 s optimized, for the same run.
_CPU_INIT_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _cpu_init_options() -> dict[str, Any]:
  """The initializer's XLA:CPU options: the project's, without LLVM's optimizations (see above)."""
  return {**compiler.options("cpu"), **_CPU_INIT_OPTIONS}


def create_train_state(rng: jax.Array, model: DiffusionModel, tx: optax.GradientTransformation,
                       mesh, rules, replicate_indivisible: bool = False,
                       on_host: bool | None = None, seconds: dict[str, float] | None = None,
                       shapes: Callable[[], StateShapes] | None = None, draw_on_host: bool | None = None
                       ) -> tuple[TrainState, Any]:
  """A fresh TrainState laid out in its shardings on `mesh`; returns (state, its shardings) once the state
  is computed and placed (waiting here times the phases; the first step would wait for it anyway).

  The random draws (one per group of alike arrays, `initializers.pooled`) are made by numpy on the host's
  cores (`draw_on_host` None: wherever they fit in half the host's available memory; True/False: forced),
  a function of `rng` alone; else by threefry in the compiled program (a pod-sized model: other values).
  On a CPU mesh every leaf is then computed directly on its shards. On an accelerator (`on_host` None:
  chosen so; True/False: forced) the parameters are computed by a program on the host's CPU, each device
  receives its slices of them, and a program on the devices fills in the rest of the state (the EMA copy
  and the optimizer's zeros: three times the parameters' bytes with AdamW, which the host then neither
  writes nor sends). Why the host: XLA:GPU compiled the SD 2.1 initializer with threefry's draws in 221 s
  on an H200 host (about a thousand draw, scale and copy kernels, each through LLVM and ptxas), where
  XLA:CPU compiles it without draws in 2.5 s. The values are bit for bit those of a CPU run.
  With several processes each draws (and on the host path computes the parameters) on its own host; the
  processes then compare a CRC-32 of every draw (or parameter), and if any differ (hosts whose CPUs round
  differently) all fall back to threefry's draws on the devices, so that replicas never start from
  different values.

  Where the time went is logged, and added to `seconds` if given: "trace" (shapes, shardings, tracing and
  lowering), "draw" (numpy's draws), "compile" (what is left of the compiles, which run on other threads
  while numpy draws), "run", "place" (the transfers to the devices), "fill" (the
  host path's program on the devices) and, with several processes, "compare" (the CRC check). `shapes`:
  gives `state_shapes(model, tx)`, kept from an earlier trace (build.Run.state_shapes); called within the
  trace phase.
  """
  clock = _PhaseClock(seconds)
  traced = shapes() if shapes else state_shapes(model, tx)
  boxed, counts = traced.boxed, traced.counts
  shardings = mesh_lib.logical_to_sharding(boxed, mesh, rules, replicate_indivisible=replicate_indivisible)
  platform = mesh.devices.flat[0].platform
  host_cpu = _host_cpu()
  draw_shapes = [jax.ShapeDtypeStruct((count, *group.shape), jnp.float32) for group, count in counts.items()]
  if draw_on_host is None:
    draw_on_host = host_cpu is not None and _fits_in_host_memory(draw_shapes, "random draws")
  if on_host is None:
    on_host = (platform != "cpu" and draw_on_host
               and _fits_in_host_memory((nn.unbox(boxed.params), draw_shapes), "parameters and their draws"))
  lower_on_devices = lambda shapes_of_draws: _lower_on_devices(
      rng, model, tx, counts, shapes_of_draws, shardings, mesh, rules, replicate_indivisible)
  device_options = _cpu_init_options() if platform == "cpu" else compiler.options(platform)
  # The programs compile on other threads while numpy draws: neither needs the other's result.
  if on_host:
    compiling = _compile_in_background(*_lower_host_path(rng, model, tx, traced, shardings, host_cpu,
                                                         draw_shapes if draw_on_host else None))
  else:
    lowered, draw_shardings = lower_on_devices(draw_shapes if draw_on_host else None)
    compiling = _compile_in_background((lowered, device_options))
  clock.lap("trace")
  draws = initializers.draw_on_host(rng, counts) if draw_on_host else None
  if draws is not None:
    clock.lap("draw")
  if on_host:
    state = _run_host_path(rng, draws, host_cpu, compiling, shardings, clock)
    if state is not None:
      logging.info("Train state (%.2f GiB) created from parameters made on the host CPU: %s.",
                   _nbytes(boxed) / 2**30, clock)
      return state, shardings
  elif draws is not None and jax.process_count() > 1:
    equal = equal_on_all_processes(draws)
    clock.lap("compare")
    if not equal:
      logging.warning("The random draws made on the hosts differ between processes; drawing on the devices "
                      "with threefry instead (other values, equal everywhere).")
      draws = None
  if on_host or (draw_on_host and draws is None):  # A fallback: threefry's draws on the devices.
    draws = None
    lowered, draw_shardings = lower_on_devices(None)
    compiling = _compile_in_background((lowered, device_options))
    clock.lap("trace")
  compiled, = [future.result() for future in compiling]
  clock.lap("compile")
  if draws is not None:
    draws = jax.block_until_ready(jax.tree.map(_place_from_host, draws, draw_shardings))
    clock.lap("place")
  state = jax.block_until_ready(compiled(rng, draws))
  clock.lap("run")
  logging.info("Train state (%.2f GiB) created on the %s devices: %s.", _nbytes(boxed) / 2**30, platform,
               clock)
  return state, shardings


def _compile_in_background(*programs: tuple[Any, dict[str, Any] | None]) -> list[concurrent.futures.Future]:
  """Starts compiling each (lowered program, XLA options) on a thread of its own; returns their futures.
  XLA releases the GIL while it compiles, as numpy does while it draws."""
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(programs), thread_name_prefix="compile_init")
  futures = [pool.submit(lowered.compile, compiler_options=options or None) for lowered, options in programs]
  pool.shutdown(wait=False)
  return futures


def _lower_on_devices(rng: jax.Array, model: DiffusionModel, tx: optax.GradientTransformation, counts: dict,
                      draw_shapes: list | None, shardings: Any, mesh, rules,
                      replicate_indivisible: bool) -> tuple[Any, list | None]:
  """The whole initializer as one program on the mesh, from host draws of `draw_shapes` (placed in their
  groups' shardings, also returned) or, where None, with threefry's draws."""
  draw_shardings = None
  if draw_shapes is not None:
    boxed_draws = [nn.Partitioned(s, names=(None, *group.axes)) for s, group in zip(draw_shapes, counts)]
    draw_shardings = mesh_lib.logical_to_sharding(boxed_draws, mesh, rules,
                                                  replicate_indivisible=replicate_indivisible)
  init = jax.jit(lambda r, d: nn.unbox(_init_state(r, model, tx, counts, draws=d)), out_shardings=shardings)
  with mesh_lib.activate(mesh, rules):
    lowered = init.lower(rng, None if draw_shapes is None else [
        jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh) for s, sh in zip(draw_shapes, draw_shardings)])
  return lowered, draw_shardings


def _lower_host_path(rng: jax.Array, model: DiffusionModel, tx: optax.GradientTransformation,
                     traced: StateShapes, shardings: Any, host_cpu: Any, draw_shapes: list | None
                     ) -> tuple[tuple[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]:
  """The host path's two programs, each with its XLA options: on the host CPU, (rng, draws) → (the
  parameters, the state's key); on the devices, those placed (and donated) → the whole state, where the
  rest (EMA copy, optimizer zeros) costs no host memory, first-touch page faults nor transfers."""
  def host_part(r, d):
    init_rng, state_rng = jax.random.split(r)
    return nn.unbox(_init_params(init_rng, model, traced.counts, draws=d)), state_rng

  # No mesh is active: the logical constraints in the initializer are no-ops on the one host device.
  on_cpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                          sharding=jax.sharding.SingleDeviceSharding(host_cpu))
  host_lowered = jax.jit(host_part).lower(on_cpu(rng), None if draw_shapes is None else
                                          [on_cpu(d) for d in draw_shapes])
  # The placed parameters are donated: the state's `params` are those buffers, `ema_params` a copy.
  fill = jax.jit(lambda params, state_rng: _state_from_params(params, state_rng, tx),
                 out_shardings=shardings, donate_argnums=0)
  fill_lowered = fill.lower(*jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                          nn.unbox((traced.boxed.params, traced.boxed.rng)),
                                          (shardings.params, shardings.rng)))
  platform = next(iter(shardings.rng.device_set)).platform
  return (host_lowered, _cpu_init_options()), (fill_lowered, compiler.options(platform))


def _run_host_path(rng: jax.Array, draws: list | None, host_cpu: Any, compiling: list, shardings: Any,
                   clock: _PhaseClock) -> TrainState | None:
  """Runs `_lower_host_path`'s programs (`compiling`: their futures): the state, or None where the
  processes' parameters differ (the caller falls back)."""
  host_program, fill_program = [future.result() for future in compiling]
  clock.lap("compile")
  host_part_values = jax.block_until_ready(host_program(*jax.device_put((rng, draws), host_cpu)))
  clock.lap("run")
  equal = equal_on_all_processes(host_part_values)
  if jax.process_count() > 1:
    clock.lap("compare")
  if not equal:
    logging.warning("The parameters initialized on the host CPUs differ between processes; initializing the "
                    "state on the devices with threefry's draws instead (other values, equal everywhere).")
    return None
  placed = jax.block_until_ready(jax.tree.map(_place_from_host, host_part_values,
                                              (shardings.params, shardings.rng)))
  del host_part_values
  clock.lap("place")
  state = jax.block_until_ready(fill_program(*placed))
  clock.lap("fill")
  return state


class _PhaseClock:
  """Seconds per named phase since the previous lap (a phase lapped twice adds up), kept in `seconds`."""

  def __init__(self, seconds: dict[str, float] | None = None):
    self.seconds = {} if seconds is None else seconds
    self._since = time.perf_counter()

  def lap(self, phase: str) -> None:
    now = time.perf_counter()
    self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._since
    self._since = now

  def __str__(self) -> str:
    return ", ".join([f"{sum(self.seconds.values()):.1f} s in all"] +
                     [f"{phase} {s:.1f} s" for phase, s in self.seconds.items()])


def _nbytes(shapes: Any) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs, boxed or not) in `shapes`."""
  return sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes))


def _place_from_host(value: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
  """`value` (the whole array, on this process's CPU) laid out in `sharding`: each of this process's
  devices receives only its slice; other processes place theirs from their own copy."""
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def equal_on_all_processes(tree: Any) -> bool:
  """Whether every process holds the same bits in every leaf of `tree` (host arrays, each process its own
  whole copy): a CRC-32 per leaf, gathered from all processes. A collective where process_count > 1:
  every process must call it at the same point. True in one process."""
  if jax.process_count() == 1:
    return True
  crcs = np.array([zlib.crc32(np.ascontiguousarray(leaf).reshape(-1).view(np.uint8))
                   for leaf in jax.tree.leaves(tree)], np.uint32)
  gathered = np.asarray(multihost_utils.process_allgather(crcs))  # [processes, leaves]
  return bool((gathered == gathered[0]).all())


def _fits_in_host_memory(shapes: Any, what: str) -> bool:
  """Whether a whole copy of `shapes` (ShapeDtypeStructs) takes at most half of the host's available
  memory: every process holds it whole on the host, which must not get a host killed."""
  state_bytes = _nbytes(shapes)
  available = _available_host_memory()
  if available is None:  # No way to tell: do not risk it.
    return False
  if 2 * state_bytes > available:
    logging.info("The %s (%.1f GiB) are over half the host's available memory (%.1f GiB): made on the "
                 "devices instead.", what, state_bytes / 2**30, available / 2**30)
    return False
  return True


def _available_host_memory(meminfo: str = "/proc/meminfo") -> int | None:
  """Bytes the host can give without swapping: Linux's MemAvailable (free memory plus the page cache it
  can drop), else the free pages; None where neither is known."""
  try:
    with open(meminfo) as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024  # Reported in kB.
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    return None


def _host_cpu() -> Any:
  """This process's first CPU device; None where JAX runs without its CPU backend (JAX_PLATFORMS=cuda)."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return None


def abstract_train_state(model: DiffusionModel, tx: optax.GradientTransformation, mesh, rules,
                         replicate_indivisible: bool = False, shapes: StateShapes | None = None) -> Any:
  """ShapeDtypeStructs with shardings: the target structure for restoring a checkpoint. `shapes`:
  `state_shapes(model, tx)` if already traced."""
  boxed = (shapes or state_shapes(model, tx)).boxed
  shardings = mesh_lib.logical_to_sharding(boxed, mesh, rules, replicate_indivisible=replicate_indivisible)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(boxed),
                      shardings)


def param_count(params: Any) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))
