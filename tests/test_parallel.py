"""Sharding, gradient accumulation, remat and mixed precision.

The multi-device checks run `tests/sharded_check.py` in a subprocess with 8 simulated CPU devices.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import build, train_state
from diffusion_jax import train_step as train_step_lib
from diffusion_jax.data import pipeline
from tests.conftest import randomized, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sharded_report(data_dir):
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), DIFFUSION_JAX_DATA_DIR=data_dir)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sharded_check.py"), data_dir], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")][0]
  return json.loads(line[len("REPORT "):])


# float32 on CPU: the sharded runs reduce in another order; measured differences are ≤ 2.4e-7.
TOL = 1e-5


@pytest.mark.slow  # The fixture trains on six meshes in an 8-device process (minutes).
@pytest.mark.parametrize("shape", ["(8, 1, 1)", "(1, 8, 1)", "(2, 2, 2)", "(1, 4, 2)"])
def test_sharded_training_matches_one_device(sharded_report, shape):
  assert sharded_report["num_devices"] == 8
  result = sharded_report["meshes"][shape]
  assert result["max_abs_loss_diff"] < TOL, result
  assert result["max_abs_param_diff"] < TOL, result


def test_fsdp_shards_parameters_and_optimizer_state(sharded_report):
  """Under fsdp = 8 each device holds ≈ 1/8 of the bytes (small replicated tensors add a little)."""
  fsdp = sharded_report["meshes"]["(1, 8, 1)"]
  assert 0.125 <= fsdp["params_fraction_on_device0"] < 0.16
  assert 0.125 <= fsdp["opt_state_fraction_on_device0"] < 0.16
  assert sharded_report["meshes"]["(8, 1, 1)"]["params_fraction_on_device0"] == 1.0  # Pure data parallel.


def test_state_initialized_on_the_host_equals_the_one_initialized_on_devices(sharded_report):
  """A process on an accelerator computes the parameters on the host CPU, copies them to their shards
  and fills in the rest of the state there (train_state.create_train_state): the bits of the same
  program on one device, laid out as the state initialized on its shards. That one differs in the last bit of one pooled draw (conv_in's kernel,
  replicated because indivisible, 6e-8 apart): XLA computes it in another fusion on 8 devices."""
  result = sharded_report["host_init_(1,8,1)"]
  assert result["leaves"] > 100 and result["bit_identical_to_one_device"] and result["same_shardings"], result
  assert result["max_abs_diff_to_on_shards"] < 1.2e-7, result  # One float32 ulp of a value below 1.
  assert 0.125 <= result["params_fraction_on_device0"] < 0.16  # Sharded 8 ways, not replicated.
  assert result["own_buffers"], result
  # The time by phase (logged; benchmarks/run.py reports it) accounts for most of the call.
  expected = {"host": ["trace", "draw", "compile", "run", "place", "fill"],
              "devices": ["trace", "draw", "compile", "place", "run"]}
  for path, (names, total_s, wall_s) in result["phases"].items():
    assert names == expected[path], result["phases"]
    assert 0.8 * wall_s < total_s <= wall_s, result["phases"]


def test_a_checkpoint_saved_with_fsdp_8_restores_on_1_and_4_devices(sharded_report):
  results = sharded_report["restore_fsdp8_onto"]
  assert results["1_device"]["bit_identical"] and results["fsdp_4"]["bit_identical"], results
  assert results["1_device"]["devices"] == [0] and results["fsdp_4"]["devices"] == [0, 1, 2, 3]
  assert results["1_device"]["params_fraction_on_device0"] == 1.0
  assert 0.25 <= results["fsdp_4"]["params_fraction_on_device0"] < 0.3  # Sharded again, 4 ways.
  assert results["1_device"]["fingerprint_equal"] and results["fsdp_4"]["fingerprint_equal"]  # Layout-free.


def test_gradient_accumulation_on_a_sharded_mesh(sharded_report):
  result = sharded_report["accumulate_2_on_(1,4,2)"]
  assert result["max_abs_loss_diff"] < TOL and result["max_abs_param_diff"] < TOL, result


def test_clear_errors_for_indivisible_shapes(sharded_report):
  errors = sharded_report["errors"]
  assert "['unet']['conv_in']['kernel'] has shape (3, 3, 1, 16): dimension 2 (logical axis 'conv_in') of " \
         "size 1 is not divisible by mesh axes ('fsdp',) of size 8" in errors["indivisible_parameter"]
  assert errors["indivisible_batch"].startswith("batch_size=12 is not divisible by the data-parallel size 8")


def _one_step(config, state_params=None, steps=2):
  run = build.build(config, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  state, _ = train_state.create_train_state(jax.random.PRNGKey(0), run.model, run.optimizer, run.mesh, run.rules)
  state = state.replace(params=randomized(state.params) if state_params is None else state_params)
  null_inputs = jax.tree.map(jnp.asarray, run.conditioning.null_inputs(1))
  step = jax.jit(functools.partial(train_step_lib.train_step, model=run.model, tx=run.optimizer,
                                   schedule=run.schedule, config=config, autoencoder=run.autoencoder,
                                   null_inputs=null_inputs))
  it = pipeline.create_train_iterator(config, tokenizer=run.conditioning.tokenizer)
  losses = []
  for _ in range(steps):
    batch = next(it)
    state, metrics = step(state, {k: jnp.asarray(batch[k]) for k in ("image", "tokens")})
    losses.append(float(metrics["loss"]))
  return state, losses


def _assert_same_training(state, losses, base_state, base_losses):
  np.testing.assert_allclose(losses, base_losses, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(base_state.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_gradient_accumulation_equals_one_big_batch(config):
  # 4 micro-batches of 4 here; 2 micro-batches are checked on a sharded mesh (sharded_check.py). Each
  # accumulation count compiles another step and state (2-3 minutes of the suite on a loaded machine).
  config.batch_size = 16
  base_state, base_losses = _one_step(config)
  config.gradient_accumulation_steps = 4
  _assert_same_training(*_one_step(config), base_state, base_losses)


def test_remat_changes_memory_not_results(config):
  base_state, base_losses = _one_step(config, steps=1)
  config.model.remat_policy = "full"
  _assert_same_training(*_one_step(config, steps=1), base_state, base_losses)


def test_bfloat16_compute_keeps_float32_parameters(config):
  base_state, base_losses = _one_step(config, steps=1)
  config.model.dtype = "bfloat16"
  state, losses = _one_step(config, steps=1)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.opt_state) if p.ndim)
  # bf16 has 8 mantissa bits: the loss agrees to ~1%, not to float32 precision.
  np.testing.assert_allclose(losses, base_losses, rtol=3e-2)
  assert losses != base_losses  # The computation really ran in another precision.
