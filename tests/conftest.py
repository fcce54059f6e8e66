"""Shared fixtures: a prepared digits dataset and a tiny config that trains in seconds."""

import collections
import os
import tempfile

import numpy as np
import pytest

# Many tests (and the training processes they start, which inherit the environment) compile the same
# tiny model: JAX's persistent compilation cache lets them share executables instead of recompiling.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffusion_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Tests compile far more than they run (most run a few steps of the smoke model), so XLA:CPU compiles them
# without LLVM's optimizations: the smoke train step compiles in 13 s instead of 23 s on a 2-core AMD EPYC
# and runs 80 ms instead of 31 ms a step. Results agree with the default level only to rounding, and the
# tests must not depend on which: at this level they caught a frozen EMA that moved by one ulp and two
# float32 comparisons below float32 resolution. The README-job test (tests/test_end_to_end.py) compiles
# at the default level: it trains 600 steps, and it is what users run. A user's own XLA_FLAGS are kept,
# and an optimization level set there wins.
from launch.local import DEVICE_COUNT_FLAG  # pylint: disable=g-import-not-at-top
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "").split()


def xla_flags(device_count: int | None = None, fast_compile: bool = True) -> str:
  """XLA_FLAGS for a process a test starts: the user's flags but their device count, FAST_COMPILE_FLAG
  (unless `fast_compile` is False or the user set a level) and `device_count` simulated CPU devices if given."""
  flags = [f for f in _USER_XLA_FLAGS if not f.startswith(DEVICE_COUNT_FLAG)]
  if fast_compile and not any(f.startswith("--xla_backend_optimization_level") for f in flags):
    flags.append(FAST_COMPILE_FLAG)
  if device_count is not None:
    flags.append(f"{DEVICE_COUNT_FLAG}={device_count}")
  return " ".join(flags)


# This process keeps the user's device count (e.g. 8 simulated devices for the sharding tests).
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in _USER_XLA_FLAGS if f.startswith(DEVICE_COUNT_FLAG)] + xla_flags().split())
# The digits feature network and reference statistics: trained / computed once per machine for the tests,
# never in the user's ~/.cache.
os.environ.setdefault("DIFFUSION_JAX_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffusion_jax_tests_cache"))
# XLA:CPU's buffers on transparent huge pages (diffusion_jax/host_memory.py) in the pytest-xdist workers
# and the commands the tests start, which inherit this environment: a process cannot set it for itself.
from diffusion_jax import host_memory  # pylint: disable=g-import-not-at-top
if host_memory.wanted(os.environ):
  os.environ.update(host_memory.with_huge_pages(os.environ))

from configs import smoke
from diffusion_jax.config import get_default_config


def pytest_collection_modifyitems(items):
  """Files with slow tests first, most slow tests first (a proxy for the longest file), each file's tests
  in their own order. pytest-xdist (`--dist loadfile --no-loadscope-reorder`) hands files to the workers in
  this order: the longest start early (longest-first scheduling), so the two workers finish together
  instead of one running the last multi-minute file alone. Without --no-loadscope-reorder, xdist
  reorders files by their number of tests, most first: the one-test README job ran last, alone."""
  slow_count = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
  items.sort(key=lambda item: -slow_count[item.path])  # A stable sort.


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The digits dataset prepared once per test session (or reused from $DIFFUSION_JAX_DATA_DIR)."""
  path = os.environ.get("DIFFUSION_JAX_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
  from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = get_default_config()
  config.dataset.data_dir = path
  pipeline.get_builder(config)
  return path


def tiny_config(data_dir: str = ""):
  """configs/smoke.py: a small model and short schedule, a few seconds to compile and run on one core."""
  c = smoke.get_config()
  c.dataset.data_dir = data_dir
  return c


def _host_noise(tree, scale: float, seed: int, add: bool):
  """Each float leaf of `tree` replaced by (leaf if add else 0) + scale · N(0, 1). Drawn on the host with
  numpy: a jax.random draw per leaf compiles a threefry program per distinct leaf shape (35 s for the
  smoke model's parameters on a 2-core CPU), and one jitted draw over the whole tree compiles in 20-27 s
  per mesh; the tests only need fixed, non-trivial values."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def draw(leaf):
    value = np.asarray(jax.device_get(leaf)) if add else 0.0
    value = (value + scale * rng.standard_normal(np.shape(leaf))).astype(leaf.dtype)
    if isinstance(leaf, jax.Array) and leaf.committed:  # Placed (and sharded) as the leaf is.
      return jax.device_put(value, leaf.sharding)
    return jax.numpy.asarray(value)  # Uncommitted, like the output of an op on uncommitted inputs.
  return jax.tree.map(draw, tree)


def randomized(params, seed: int = 0):
  """Every leaf replaced by 0.2 · N(0, 1): zero-initialized output layers would hide the conditioning."""
  return _host_noise(params, 0.2, seed, add=False)


def perturbed(params, scale: float = 0.05, seed: int = 0):
  """params + scale · N(0, 1), so that zero-initialized layers pass their input on."""
  return _host_noise(params, scale, seed, add=True)


@pytest.fixture
def config(data_dir):
  return tiny_config(data_dir)


@pytest.fixture(scope="session")
def twenty_steps(data_dir, tmp_path_factory):
  """(config, workdir, final state) of a 20-step tiny run with checkpoints at 10 and 20, trained once per
  session. Tests that damage or change it work on a copy of the workdir."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir)
  config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 20, 10, 10
  config.eval_num_examples = 16
  workdir = str(tmp_path_factory.mktemp("twenty_steps"))
  return config, workdir, jax.device_get(train.train_and_evaluate(config, workdir))
