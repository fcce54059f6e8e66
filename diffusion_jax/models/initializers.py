"""Random parameter initializers whose draws can be pooled: one draw per group of alike arrays.

Outside `pooled`, each initializer draws its array from the key Flax gives it, as Flax's own initializer
of the same name does (the same values, to float32 rounding of the standard deviation). Inside
`pooled(init_fn, rng)`, the arrays of one group (same distribution, shape and logical axes) are drawn
together as a single [n, *shape] array and handed out in creation order. Why: compiling the
initializer was most of a train state's creation time, and nearly all of that compile the random draws,
each a threefry hash plus an inverse-CDF transform compiled once per array. A U-Net has many alike
arrays (q, k, v and output projections, repeated ResNet blocks): configs/smoke.py's 92 random kernels fall
into 24 groups.

A group's draw is constrained to its members' logical axes, so every device draws only its shards
(threefry is partitionable) and pooling does not replicate anything a pod would not hold anyway.

Or the groups' draws are made by numpy on the host's cores (`draw_on_host`) and handed to `pooled`: then
the compiled initializer has no random number generation at all, and the draws run ~5× faster on the same
cores (train_state.create_train_state does this wherever the draws fit in the host's memory).

The pool is scoped with a context variable, the way Flax scopes its logical axis rules: the initializers
are called by Flax with (key, shape, dtype) only, so there is no argument to carry it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import math
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_TRUNCATED = "truncated_normal"  # in [-2, 2] standard deviations, as Flax's variance scaling draws
_NORMAL = "normal"
# std of a standard normal truncated to [-2, 2]: dividing by it gives the truncated draw unit variance.
_TRUNCATED_STD = 0.87962566103423978


@dataclasses.dataclass(frozen=True)
class _Group:
  """What arrays drawn together share: their distribution, shape and logical axes (hence sharding)."""

  distribution: str
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]


def _draw_unit(key: jax.Array, distribution: str, shape: tuple[int, ...]) -> jax.Array:
  """float32 draws of unit scale: a standard normal, or one truncated to [-2, 2]."""
  if distribution == _TRUNCATED:
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
  return jax.random.normal(key, shape, jnp.float32)


_SAME_FN = ", and `counts` must come from recording the same function"


class _Recorder:
  """The counting pass (abstract): counts each group's members in creation order."""

  def __init__(self):
    self.counts: dict[_Group, int] = {}

  def take(self, group: _Group) -> jax.Array:
    self.counts[group] = self.counts.get(group, 0) + 1
    return jnp.zeros(group.shape, jnp.float32)


class _Dispenser:
  """Second pass: hands out the rows of each group's single draw, in the order the counting pass saw."""

  def __init__(self, draws: dict[_Group, jax.Array]):
    self.draws = draws
    self.taken = dict.fromkeys(draws, 0)

  def take(self, group: _Group) -> jax.Array:
    draw, index = self.draws.get(group), self.taken.get(group, 0)
    if draw is None or index >= draw.shape[0]:
      raise RuntimeError(f"pooled initialization: the second pass created an array the counting pass did "
                         f"not count ({group}); the initializer function must be deterministic{_SAME_FN}")
    self.taken[group] = index + 1
    return draw[index]


_POOL: contextvars.ContextVar[_Recorder | _Dispenser | None] = contextvars.ContextVar("pool", default=None)


@contextlib.contextmanager
def _using(pool: _Recorder | _Dispenser) -> Iterator[None]:
  token = _POOL.set(pool)
  try:
    yield
  finally:
    _POOL.reset(token)


@contextlib.contextmanager
def recording() -> Iterator[dict[_Group, int]]:
  """Within it, the initializers count their arrays per group (and return zeros): trace the initializer
  function abstractly (jax.eval_shape) inside, then hand the yielded counts to `pooled`. This lets a
  caller that traces the initializer anyway for its shapes (train_state: the state's shardings) spare
  `pooled` its own counting trace of the whole model."""
  recorder = _Recorder()
  with _using(recorder):
    yield recorder.counts


def pooled(init_fn: Callable[[jax.Array], Any], rng: jax.Array, counts: dict[_Group, int] | None = None,
           draws: list[jax.Array] | None = None) -> Any:
  """init_fn(rng) with the draws of this module's initializers pooled per group.

  init_fn must create the same arrays in the same order every call (a Flax `model.init` does). Group i,
  numbered by first appearance, draws from fold_in(rng, i), so the values are a function of rng alone,
  whatever the mesh; they are not the values an unpooled init_fn(rng) gives. `counts`: what `recording`
  counted for this init_fn; without it, init_fn is first traced abstractly to count. `draws`: the groups'
  unit draws made elsewhere, in the order of `counts` (`draw_on_host`), in place of threefry's.
  """
  if counts is None:
    with recording() as counts:
      jax.eval_shape(init_fn, rng)
  if draws is None:
    draws = [_draw_unit(jax.random.fold_in(rng, i), group.distribution, (count, *group.shape))
             for i, (group, count) in enumerate(counts.items())]
  if [tuple(d.shape) for d in draws] != [(count, *group.shape) for group, count in counts.items()]:
    raise ValueError(f"pooled initialization: draws of shapes {[tuple(d.shape) for d in draws]} do not match "
                     f"the counted groups {[(count, *group.shape) for group, count in counts.items()]}")
  dispenser = _Dispenser({group: nn.with_logical_constraint(draw, (None, *group.axes))
                          for group, draw in zip(counts, draws)})
  with _using(dispenser):
    out = init_fn(rng)
  if dispenser.taken != counts:
    raise RuntimeError("pooled initialization: the second pass created fewer arrays than the counting pass; "
                       f"the initializer function must be deterministic{_SAME_FN}")
  return out


# Values per independently seeded stretch of a host draw: the unit of work of the draw's threads, fixed so
# that the values do not depend on how many threads drew them.
_HOST_CHUNK = 1 << 20


def draw_on_host(rng: jax.Array, counts: dict[_Group, int], threads: int | None = None) -> list[np.ndarray]:
  """The groups' unit draws ([count, *shape] float32 each, in the order of `counts`) made by numpy on this
  host's cores: a function of rng's key data alone, for any number of threads (and on any host whose libm
  rounds alike: numpy's ziggurat calls exp in its rare wedge steps, so processes compare their draws).

  Why: XLA:CPU draws truncated normals at ~18 M values/s on 2 cores (threefry and an inverse error function,
  compiled without LLVM's optimizations) and its run barely spreads over more cores; numpy's PCG64 and
  ziggurat draw ~76 M/s on the same 2 cores (sd21's 666 M in 8.8 s), on as many threads as the host has,
  and leave XLA a program with no random number generation to compile. Each stretch of _HOST_CHUNK values
  has its own PCG64 stream (SeedSequence(key data, spawn_key=(group, stretch))); truncated normals are
  standard normals with those outside (-2, 2) rejected, the same distribution as
  jax.random.truncated_normal(key, -2, 2).
  """
  entropy = [int(word) for word in np.asarray(jax.random.key_data(rng)).reshape(-1)]
  out = [np.empty((count, *group.shape), np.float32) for group, count in counts.items()]
  jobs = []
  for g, (group, flat) in enumerate(zip(counts, (o.reshape(-1) for o in out))):
    for c, start in enumerate(range(0, flat.size, _HOST_CHUNK)):
      seed = np.random.SeedSequence(entropy, spawn_key=(g, c))
      jobs.append((flat[start:start + _HOST_CHUNK], group.distribution, seed))
  if threads is None:
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL while it draws
    list(pool.map(lambda job: _fill_unit(*job), jobs))
  return out


def _fill_unit(out: np.ndarray, distribution: str, seed: np.random.SeedSequence) -> None:
  """Fills the 1-D `out` with unit draws of `distribution` from a PCG64 stream seeded by `seed`."""
  generator = np.random.Generator(np.random.PCG64(seed))
  if distribution != _TRUNCATED:
    generator.standard_normal(out=out, dtype=np.float32)
    return
  filled = 0
  while filled < out.size:  # 95.4% of standard normals fall in (-2, 2): one round nearly always suffices
    need = out.size - filled
    x = generator.standard_normal(need + need // 16 + 64, dtype=np.float32)
    x = x[np.abs(x) < 2.0][:need]
    out[filled:filled + x.size] = x
    filled += x.size


def _fan_in(shape: tuple[int, ...]) -> int:
  """Inputs per output unit of a kernel [..., in, out] (a conv kernel's receptive field times in)."""
  return math.prod(shape[:-1])


@dataclasses.dataclass(frozen=True)
class _RandomInit:
  """A Flax initializer (key, shape, dtype) → array: a unit draw times `stddev(shape)`."""

  distribution: str
  stddev: Callable[[tuple[int, ...]], float]
  axes: tuple[str | None, ...]

  def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    shape = tuple(shape)
    pool = _POOL.get()
    if pool is None:
      unit = _draw_unit(key, self.distribution, shape)
    else:
      unit = pool.take(_Group(self.distribution, shape, self.axes))
    return (unit * self.stddev(shape)).astype(dtype)


def lecun_normal(axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
  """Flax's `lecun_normal()` (truncated normal, variance 1 / fan_in) on a kernel with logical `axes`."""
  stddev = lambda shape: math.sqrt(1.0 / _fan_in(shape)) / _TRUNCATED_STD
  return nn.with_logical_partitioning(_RandomInit(_TRUNCATED, stddev, tuple(axes)), axes)


def normal(stddev: float, axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
  """Flax's `normal(stddev)` on an array with logical `axes` (embedding tables)."""
  return nn.with_logical_partitioning(_RandomInit(_NORMAL, lambda shape: stddev, tuple(axes)), axes)
