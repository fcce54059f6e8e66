"""How our programs are compiled: XLA compiler options per platform, and `jit`, which applies them.

XLA:CPU (jaxlib 0.10) hands convolutions and elementwise/reduce fusions to YNNPACK by default. On the
2-core AMD EPYC (AVX2) this project is developed on, XLA's own emitters are faster, measured side by
side in one process (`benchmarks/run.py --suite=train` reports both sides with and without it):
the digits train step 340 -> 257 ms, the benchmarks' small preset 736 -> 546 ms (the peer's step, given
the same option, 681 -> 540 ms). YNNPACK's convolutions alone took the digits step to 324 ms, its
elementwise and reduce fusions alone to 332 ms; its dots were neutral. Accelerators get no options.

`DIFFUSION_JAX_XLA_CPU_YNN=1` keeps XLA's default (YNNPACK on), for a CPU where it is the faster choice.

On a CPU the train step also does not donate its input state (`donates_state`): XLA:CPU has no
multi-output fusion, so the parameters, Adam moments and EMA are updated by separate fusions that each
read the old values, and to write a donated buffer in place it first copies the parameters and both
moments (1,753 copies in the medium benchmark's step). Without donation the outputs get fresh buffers:
side by side on one Intel Xeon host, the medium step 1,461 -> 1,295 ms (1.13x), the small and digits
steps unchanged (1.007x, 1.005x), the compiled peak 889 -> 974 MiB at medium (the copies were temporary
buffers of almost the same size). Accelerators keep donation, where the state is most of the memory.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # No library fusions: XLA emits every op.


def options(platform: str | None = None) -> dict[str, Any]:
  """The compiler options of programs on `platform` (default: JAX's default backend)."""
  platform = platform or jax.default_backend()
  if platform == "cpu" and os.environ.get("DIFFUSION_JAX_XLA_CPU_YNN") != "1" and _cpu_options_accepted():
    return dict(_CPU_OPTIONS)
  return {}


@functools.cache
def _cpu_options_accepted() -> bool:
  """Whether this jaxlib knows the options (an experimental flag may be renamed or dropped): checked once
  per process on a one-op program, so that a newer jaxlib compiles with its defaults instead of failing."""
  try:
    jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(compiler_options=_CPU_OPTIONS)
  except Exception as exc:  # pylint: disable=broad-except  (jaxlib raises its own XlaRuntimeError types)
    logging.warning("XLA:CPU options %s not accepted by this jaxlib (%s); compiling with its defaults.",
                    _CPU_OPTIONS, str(exc).splitlines()[0])
    return False
  return True


def donates_state(platform: str | None = None) -> bool:
  """Whether the train step donates its input state on `platform` (default: JAX's default backend):
  everywhere but on a CPU, where updating donated buffers in place costs copies (see above)."""
  return (platform or jax.default_backend()) != "cpu"


def jit(fun: Callable, **kwargs) -> Any:
  """`jax.jit(fun, **kwargs)` compiled with this platform's `options()`. Call it at run time (not at import):
  it asks JAX for the default backend, which must not start before `jax.distributed.initialize`."""
  return jax.jit(fun, compiler_options=options() or None, **kwargs)
