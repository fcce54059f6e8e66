"""The train step compiled to fit its devices' memory: the remat policy, checked against XLA's own count.

After compiling, XLA reports what the program needs per device (`compiled.memory_analysis()`: its
arguments, outputs, donated outputs written in place, temporaries and code); the devices report how much
their allocator may hold (`memory_stats()['bytes_limit']`; a CPU reports nothing, so nothing is
checked there). A step that cannot fit fails at its first call with an out-of-memory error deep in the
runtime, after the state was created; here it stops at start-up with the sizes and what to change. With
`model.remat_policy = 'auto'` the policies are compiled in order of less recomputation until one fits:
'none' (every activation kept for the backward pass), 'dots' (matmul and convolution outputs kept, the
elementwise chains recomputed), 'dots_no_batch' (only the outputs of matmuls without batch dimensions
kept), 'full' (each block recomputed from its input). A job whose step fits without remat compiles once,
as before. Inference has no backward pass: it builds the model without remat ('auto' is 'none' there).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import logging
import jax

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


def compile_train_step(run: Any, state_shardings: Any, abstract_state: Any) -> tuple[Any, str]:
  """(the jitted train step, its remat policy), compiled for `abstract_state` and the global batch; the
  jitted step reuses that program at its first call. Raises DoesNotFit where the step does not fit the
  devices' memory (config.model.remat_policy given), or no policy does ('auto')."""
  requested = run.config.model.remat_policy
  policies = AUTO_ORDER if requested == AUTO else (requested,)
  limit = device_limit(run.mesh.devices.flat)
  tried = {}  # policy: its Footprint, or the compiler's out-of-memory message
  for policy in policies:
    candidate = with_remat(run, policy)
    step_fn = make_train_step(candidate, state_shardings)
    try:
      with mesh_lib.activate(run.mesh, run.rules):  # As in the training loop, which calls the step.
        compiled = step_fn.lower(abstract_state, abstract_global_batch(candidate)).compile()
    except jax.errors.JaxRuntimeError as exc:  # A TPU compiler checks its memory itself.
      if "RESOURCE_EXHAUSTED" not in str(exc) or limit is None:
        raise
      tried[policy] = str(exc).splitlines()[0]
      continue
    footprint = Footprint.of(compiled)
    if limit is None or footprint is None or fits(footprint.peak, limit[0], auto=requested == AUTO):
      if limit is not None and footprint is not None:
        logging.info("Train step (remat_policy=%s): %s per device, of the %s that %s holds.", policy,
                     footprint.describe(), _gib(limit[0]), limit[1])
      elif requested == AUTO:
        logging.info("remat_policy=auto: the devices report no memory limit; compiled without remat.")
      return step_fn, policy
    tried[policy] = footprint
  raise DoesNotFit(_does_not_fit(run.config, requested, tried, limit), tried)


def _does_not_fit(config, requested: str, tried: dict[str, Any], limit: tuple[int, Any]) -> str:
  sizes = "; ".join(f"remat_policy={policy}: {f.describe() if isinstance(f, Footprint) else f}"
                    for policy, f in tried.items())
  share = f"{AUTO_HEADROOM:.0%} of " if requested == AUTO else ""
  remedies = [f"lower batch_size (now {config.batch_size}) and raise gradient_accumulation_steps (now "
              f"{config.gradient_accumulation_steps}) to keep the batch",
              "shard the state over more devices (mesh.shape's fsdp axis)"]
  if config.model.dtype == "float32":
    remedies.append("compute in bfloat16 (model.dtype)")
  if requested != AUTO:
    remedies.insert(0, "set model.remat_policy=auto (tries " + ", ".join(AUTO_ORDER[1:]) + ")")
  return (f"The train step does not fit in device memory: {sizes}; {limit[1]} holds {share}{_gib(limit[0])}. "
          f"To fit: " + "; or ".join(remedies) + ".")


def _gib(nbytes: float) -> str:
  return f"{nbytes / 2**30:.2f} GiB"
