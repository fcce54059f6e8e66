"""TrainState and its creation directly in its sharded layout (eval_shape → shardings → jit init)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any
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


def _init_state(rng: jax.Array, model: DiffusionModel, tx: optax.GradientTransformation,
                counts: dict | None = None, abstract: bool = False) -> TrainState:
  """Boxed (nn.Partitioned) state: logical axis names travel with the leaves. `counts`: the pooled draws'
  counts (`initializers.recording`, as `state_shapes` records them), else counted here by one more trace.
  `abstract`: for eval_shape only (the same shapes, without pooling the random draws)."""
  init_rng, state_rng = jax.random.split(rng)
  init_params = lambda r: model.init(r, *model.dummy_inputs())["params"]
  params = init_params(init_rng) if abstract else initializers.pooled(init_params, init_rng, counts)
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, ema_params=params, opt_state=tx.init(params), rng=state_rng,
                    nonfinite_steps=zero, nonfinite_streak=zero)


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


# The initializer runs once, but compiling it is most of the state's creation time, and nearly all of that
# compile is the random draws: a threefry hash and an inverse-CDF transform compiled per draw.
# models/initializers.pooled makes one draw per group of alike arrays (92 kernels -> 24 draws at
# configs/smoke.py, 251 -> 51 at the SD 2.1 layout), and on the CPU the program is compiled without LLVM's
# optimizations, for a program that runs for a fraction of a second. State creation at smoke, timed in one
# process: per-array draws, optimized 26.6 s; per-array, O0 13.7 s; pooled, O0 8.6 s
# (of which the compile 5.9 s; optimized, the pooled draws still take 17.1 s to compile). Values are a
# deterministic function of the seed, equal on every mesh (the same per-element code runs on each shard)
# but for the last bit where XLA fuses an array's scaling differently (a replicated, indivisible kernel on
# 8 devices: tests/test_parallel.py); they differ from an optimized build's in the last bits.
_CPU_INIT_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def create_train_state(rng: jax.Array, model: DiffusionModel, tx: optax.GradientTransformation,
                       mesh, rules, replicate_indivisible: bool = False,
                       on_host: bool | None = None, seconds: dict[str, float] | None = None,
                       shapes: StateShapes | None = None) -> tuple[TrainState, Any]:
  """A fresh TrainState laid out in its shardings on `mesh`; returns (state, its shardings) once the state
  is computed and placed (waiting here times the phases; the first step would wait for it anyway).

  On a CPU mesh every leaf is initialized directly on its shards. On an accelerator (`on_host` None:
  chosen so; True/False: forced) the same program runs on the host's CPU and each device receives its
  slices of the result: XLA:GPU compiled the initializer of the SD 2.1 layout in 221 s on an H200 host
  (about a thousand draw, scale and copy kernels, each through LLVM and ptxas), where XLA:CPU without
  LLVM's optimizations compiles it in 7 s and runs it in 57 s on 2 cores (the path is not yet timed on a
  GPU host, whose 16 cores share the run). The values are the CPU program's, the same as a CPU run's.
  With several processes each runs the host program on its own CPU; the processes then compare a CRC-32
  of every leaf, and if any differ (hosts whose CPUs round differently) all fall back to initializing on
  the devices, so that replicas never start from different values.

  Where the time went is logged, and added to `seconds` if given: "trace" (shapes, shardings, tracing and
  lowering), "compile", "run", and on the host path "place" (the transfers to the devices) and, with
  several processes, "compare" (the CRC check). `shapes`: `state_shapes(model, tx)` if already traced.
  """
  clock = _PhaseClock(seconds)
  traced = shapes or state_shapes(model, tx)
  shapes, counts = traced.boxed, traced.counts
  shardings = mesh_lib.logical_to_sharding(shapes, mesh, rules, replicate_indivisible=replicate_indivisible)
  platform = mesh.devices.flat[0].platform
  host_cpu = _host_cpu()
  if on_host is None:
    on_host = platform != "cpu" and host_cpu is not None and _fits_in_host_memory(nn.unbox(shapes))
  init_fn = lambda r: nn.unbox(_init_state(r, model, tx, counts))
  cpu_options = {**compiler.options("cpu"), **_CPU_INIT_OPTIONS}
  if on_host:
    host_rng = jax.device_put(rng, host_cpu)
    # No mesh is active: the logical constraints in the initializer are no-ops on the one host device.
    lowered = jax.jit(init_fn).lower(host_rng)
    clock.lap("trace")
    compiled = lowered.compile(compiler_options=cpu_options)
    clock.lap("compile")
    host_state = jax.block_until_ready(compiled(host_rng))
    clock.lap("run")
    equal = equal_on_all_processes(host_state)
    if jax.process_count() > 1:
      clock.lap("compare")
    if equal:
      state = jax.block_until_ready(jax.tree.map(_place_from_host, host_state, shardings))
      clock.lap("place")
      logging.info("Train state (%.2f GiB) created on the host CPU: %s.", _nbytes(shapes) / 2**30, clock)
      return state, shardings
    logging.warning("The state initialized on the host CPUs differs between processes; initializing it on "
                    "the devices instead (slower to compile, equal everywhere).")
  options = cpu_options if platform == "cpu" else compiler.options(platform)
  init = jax.jit(init_fn, out_shardings=shardings)
  with mesh_lib.activate(mesh, rules):
    lowered = init.lower(rng)
  clock.lap("trace")
  compiled = lowered.compile(compiler_options=options or None)
  clock.lap("compile")
  state = jax.block_until_ready(compiled(rng))
  clock.lap("run")
  logging.info("Train state (%.2f GiB) created on the %s devices: %s.", _nbytes(shapes) / 2**30, platform, clock)
  return state, shardings


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


def _fits_in_host_memory(shapes: Any) -> bool:
  """Whether a whole copy of `shapes` (ShapeDtypeStructs) takes at most half of the host's available
  memory: every process holds the whole state on the host path, which must not get a host killed."""
  state_bytes = _nbytes(shapes)
  available = _available_host_memory()
  if available is None:  # No way to tell: do not risk it.
    return False
  if 2 * state_bytes > available:
    logging.info("The train state (%.1f GiB) is over half the host's available memory (%.1f GiB): "
                 "initializing it on the devices.", state_bytes / 2**30, available / 2**30)
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
