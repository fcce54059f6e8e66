"""The train step compiled to fit its devices' memory: remat policy and micro-batches, checked against XLA's count.

After compiling, XLA reports what the program needs per device (`compiled.memory_analysis()`: its
arguments, outputs, donated outputs written in place, temporaries and code); the devices report how much
their allocator may hold (`memory_stats()['bytes_limit']`; a CPU reports nothing, so nothing is
checked there). A step that cannot fit fails at its first call with an out-of-memory error deep in the
runtime, after the state was created; here it stops at start-up with the sizes and what to change. With
`model.remat_policy = 'auto'` the step trains with the least recomputation that fits (compile order:
compile_train_step): 'none' (every activation kept for the backward pass), 'dots' (matmul and
convolution outputs kept, the elementwise chains recomputed), 'dots_no_batch' (only the outputs of
matmuls without batch dimensions kept), 'full' (each block recomputed from its input). With
`auto_gradient_accumulation` the global batch (the training recipe) stays as configured and its
micro-batch per device shrinks until the step fits: the batch size per device that the memory allows,
chosen without changing what is trained. A job whose step fits as configured compiles once, as before.
Inference has no backward pass: it builds the model without remat ('auto' is 'none' there).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from diffusion_jax.errors import UserError
from diffusion_jax.models import unet as unet_lib
from diffusion_jax.parallel import mesh as mesh_lib
from diffusion_jax.train_step import abstract_global_batch, make_train_step

AUTO = "auto"
AUTO_ORDER = ("none", "dots", "dots_no_batch", "full")  # Most activations kept (least recompute) first.
assert set(AUTO_ORDER) == {"none", *unet_lib.REMAT_POLICIES}
# 'auto' keeps this share of the limit free: allocators fragment, and other programs' buffers may be live.
AUTO_HEADROOM = 0.95


class DoesNotFit(UserError):
  """No remat policy tried makes the train step fit; `tried`: {policy: its Footprint, or the compiler's
  out-of-memory message}, in the order tried."""

  def __init__(self, message: str, tried: dict[str, Any]):
    super().__init__(message)
    self.tried = tried


@dataclasses.dataclass(frozen=True)
class Footprint:
  """A compiled program's memory per device, in bytes, from XLA's memory analysis."""

  arguments: int
  outputs: int
  aliased: int  # Outputs written into donated arguments' buffers: counted once, in `arguments`.
  temporaries: int
  code: int

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @classmethod
  def of(cls, compiled: Any) -> Footprint | None:
    """None where the backend gives no memory analysis."""
    try:
      m = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
      return None
    if m is None:
      return None
    return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes,
               m.generated_code_size_in_bytes)

  def describe(self) -> str:
    return (f"{_gib(self.peak)} (arguments {_gib(self.arguments)}, new outputs "
            f"{_gib(self.outputs - self.aliased)}, temporaries {_gib(self.temporaries)})")


def device_limit(devices: Sequence[Any]) -> tuple[int, Any] | None:
  """(bytes the allocator may hold, the device) for the smallest such limit among `devices` that are
  this process's; None where none reports one (CPU)."""
  limits = []
  for device in devices:
    if device.process_index != jax.process_index():
      continue
    try:
      stats = device.memory_stats()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
      stats = None
    if stats and stats.get("bytes_limit"):
      limits.append((int(stats["bytes_limit"]), device))
  return min(limits, key=lambda pair: pair[0]) if limits else None


def agreed_device_limit(devices: Sequence[Any]) -> tuple[int, Any] | None:
  """device_limit agreed by all processes: the smallest any process reports (rounded down to KiB, which a
  32-bit collective holds up to 2 TiB), and None only where none reports one. Every process then compiles
  the same candidates and trains the same step: a different choice on one host would give the processes
  programs whose collectives do not match. A collective: every process calls it, from the same thread as
  its other collectives (not the compile thread)."""
  local = device_limit(devices)
  if jax.process_count() == 1:
    return local
  kib = np.int32(local[0] // 1024 if local else -1)
  gathered = np.asarray(multihost_utils.process_allgather(kib)).reshape(-1)  # [processes]
  if gathered.max() < 0:
    return None
  process = int(np.argmin(np.where(gathered < 0, np.iinfo(np.int32).max, gathered)))
  owner = local[1] if process == jax.process_index() else f"a device of process {process}"
  return int(gathered[process]) * 1024, owner


def fits(peak: int, limit: int, auto: bool) -> bool:
  """Whether a program needing `peak` bytes per device fits a device that may hold `limit` bytes: within
  AUTO_HEADROOM of it when 'auto' chooses, else at all."""
  return peak <= limit * (AUTO_HEADROOM if auto else 1.0)


def with_remat(run: Any, policy: str) -> Any:
  """`run` (a build.Run) whose U-Net recomputes its blocks' activations by `policy` ('none': keeps them)."""
  unet = run.model.unet
  if unet.remat_policy == policy:
    return run
  return dataclasses.replace(run, model=run.model.clone(unet=unet.clone(remat_policy=policy)))


def with_accumulation(run: Any, steps: int) -> Any:
  """`run` whose train step splits the (unchanged) global batch into `steps` micro-batches."""
  if run.config.gradient_accumulation_steps == steps:
    return run
  config = run.config.copy_and_resolve_references()  # A Run's config is never modified.
  config.gradient_accumulation_steps = steps
  return dataclasses.replace(run, config=config)


@dataclasses.dataclass(frozen=True)
class StepFit:
  """What compile_train_step chose: the step's remat policy and micro-batches, and its Footprint (None
  where the backend gives no memory analysis)."""

  remat_policy: str
  gradient_accumulation_steps: int
  footprint: Footprint | None


def accumulation_candidates(config: Any, data_parallel: int) -> tuple[int, ...]:
  """The micro-batch counts to try, fewest first: config.gradient_accumulation_steps, and with
  config.auto_gradient_accumulation each multiple of it that divides the batch per data-parallel device
  (down to micro-batches of one example per device)."""
  k = config.gradient_accumulation_steps
  if not config.auto_gradient_accumulation:
    return (k,)
  per_device = config.batch_size // data_parallel
  return tuple(m for m in range(k, per_device + 1, k) if per_device % m == 0)


def compile_train_step(run: Any, state_shardings: Any, abstract_state: Any,
                       limit: tuple[int, Any] | None) -> tuple[Any, StepFit]:
  """(the jitted train step, what it was compiled with), for `abstract_state` and the global batch; the
  jitted step reuses that program at its first call, and splits the batch into the StepFit's micro-batches
  (not necessarily run.config's). `limit`: (bytes per device, the device) from agreed_device_limit, or
  None (nothing to check: the step as configured).

  Where the devices report a memory limit, candidates are compiled until one fits: the configured micro-
  batch count with each remat policy (config.model.remat_policy, or those of AUTO_ORDER for 'auto'), then,
  with config.auto_gradient_accumulation, larger counts. Remat comes first: it adds compute (at most one
  more forward pass), while each further micro-batch runs every matmul on fewer rows, reads every weight
  again and, with fsdp, all-gathers the parameters again. At each count 'auto' compiles 'none', then 'full'
  (the fewest activations kept: where it does not fit, no policy does, and the count is left), then the
  policies between. Candidates that cannot fit by what was compiled already are not compiled: where the
  state and the batch alone exceed the limit, and where a policy's temporaries, shrunk in proportion to
  the smaller micro-batch, would still not fit (activations shrink at most that fast; the accumulated
  gradients do not shrink). Raises DoesNotFit where nothing fits.
  """
  config = run.config
  auto_remat = config.model.remat_policy == AUTO
  choosing = auto_remat or config.auto_gradient_accumulation  # Keeps AUTO_HEADROOM free.
  tried = {}  # (policy, micro-batches): its Footprint, or the compiler's out-of-memory message

  def cannot_fit(policy: str, steps: int) -> bool:
    for (other, other_steps), f in tried.items():
      if not isinstance(f, Footprint):
        continue
      state_and_batch = f.peak - f.temporaries
      if not fits(state_and_batch, limit[0], choosing):
        return True  # No policy or micro-batch count changes the state in and out or the batch.
      if other in (policy, AUTO_ORDER[-1]) and not fits(state_and_batch + f.temporaries * other_steps // steps,
                                                        limit[0], choosing):
        return True
    return False

  def attempt(policy: str, steps: int) -> tuple[Any, StepFit] | None:
    if cannot_fit(policy, steps):
      return None
    candidate = with_remat(with_accumulation(run, steps), policy)
    step_fn = make_train_step(candidate, state_shardings)
    try:
      with mesh_lib.activate(run.mesh, run.rules):  # As in the training loop, which calls the step.
        compiled = step_fn.lower(abstract_state, abstract_global_batch(candidate)).compile()
    except jax.errors.JaxRuntimeError as exc:  # A TPU compiler checks its memory itself.
      if "RESOURCE_EXHAUSTED" not in str(exc) or limit is None:
        raise
      tried[policy, steps] = str(exc).splitlines()[0]
      return None
    footprint = Footprint.of(compiled)
    if limit is None or footprint is None or fits(footprint.peak, limit[0], choosing):
      return step_fn, StepFit(policy, steps, footprint)
    tried[policy, steps] = footprint
    return None

  def best_at(steps: int) -> tuple[Any, StepFit] | None:
    if not auto_remat:
      return attempt(config.model.remat_policy, steps)
    least, *between, fewest = AUTO_ORDER
    if found := attempt(least, steps):
      return found
    if (fallback := attempt(fewest, steps)) is None:
      return None
    return next(filter(None, (attempt(policy, steps) for policy in between)), fallback)

  counts = accumulation_candidates(config, mesh_lib.data_parallel_size(run.mesh))
  found = next(filter(None, map(best_at, counts)), None)
  if found is None:
    raise DoesNotFit(_does_not_fit(config, tried, limit, choosing, counts), tried)
  step_fn, fit = found
  if limit is not None and fit.footprint is not None:
    logging.info("Train step (remat_policy=%s, gradient_accumulation_steps=%d): %s per device, of the %s "
                 "that %s holds.", fit.remat_policy, fit.gradient_accumulation_steps, fit.footprint.describe(),
                 _gib(limit[0]), limit[1])
  elif auto_remat:
    logging.info("remat_policy=auto: the devices report no memory limit; compiled without remat.")
  return step_fn, fit


def _does_not_fit(config, tried: dict[Any, Any], limit: tuple[int, Any], choosing: bool,
                  counts: Sequence[int]) -> str:
  several_counts = len(counts) > 1
  sizes = "; ".join(f"remat_policy={policy}" + (f" with {steps} micro-batch{'es' * (steps > 1)}" if several_counts
                                                  else "") + ": " + (f.describe() if isinstance(f, Footprint) else f)
                    for (policy, steps), f in tried.items())
  if several_counts:  # Counts not compiled were ruled out by the sizes above (compile_train_step).
    sizes += f"; no count of micro-batches ({', '.join(map(str, counts))}) fits"
  share = f"{AUTO_HEADROOM:.0%} of " if choosing else ""
  fixed = [f.peak - f.temporaries for f in tried.values() if isinstance(f, Footprint)]
  if fixed and not fits(min(fixed), limit[0], choosing):
    sizes += (f"; the state in and out and the batch alone take {_gib(min(fixed))}, which no remat policy or "
              f"micro-batch count changes")
  remedies = ["shard the state over more devices (mesh.shape's fsdp axis)"]
  if not config.auto_gradient_accumulation:
    remedies.insert(0, f"set auto_gradient_accumulation=True, or lower batch_size (now {config.batch_size}) "
                       f"and raise gradient_accumulation_steps (now {config.gradient_accumulation_steps}) to keep "
                       f"the batch")
  if config.model.dtype == "float32":
    remedies.append("compute in bfloat16 (model.dtype)")
  if config.model.remat_policy != AUTO:
    remedies.insert(0, "set model.remat_policy=auto (tries " + ", ".join(AUTO_ORDER[1:]) + ")")
  return (f"The train step does not fit in device memory: {sizes}; {limit[1]} holds {share}{_gib(limit[0])}. "
          f"To fit: " + "; or ".join(remedies) + ".")


def _gib(nbytes: float) -> str:
  return f"{nbytes / 2**30:.2f} GiB"
