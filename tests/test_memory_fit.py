"""The train step checked against its devices' memory, and remat_policy='auto' (diffusion_jax/memory_fit.py).

A CPU reports no memory limit, so the tests give the search a device limit of their own; the footprints
are XLA's count of the real compiled steps.
"""

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import build, config as config_lib, memory_fit
from diffusion_jax.errors import UserError
from tests.conftest import tiny_config


def _config(remat_policy: str):
  """A one-level, unconditional smoke U-Net: ~9 s per compile of its step on a 2-core CPU."""
  config = tiny_config()
  config.model.conditioning = "none"
  config.model.unet.channel_mult = (1,)
  config.model.unet.transformer_depth = (1,)
  config.model.unet.mid_transformer_depth = 0
  config.model.remat_policy = remat_policy
  return config


def _compile(config, limit, monkeypatch):
  monkeypatch.setattr(memory_fit, "device_limit", lambda devices: None if limit is None else (limit, "fake:0"))
  run = build.build(config, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  abstract = run.abstract_state()
  return memory_fit.compile_train_step(run, jax.tree.map(lambda a: a.sharding, abstract), abstract)


def test_footprint_is_xlas_count_of_arguments_outputs_and_donated_buffers():
  x = jax.ShapeDtypeStruct((1000,), jnp.float32)  # 4,000 bytes.
  plain = memory_fit.Footprint.of(jax.jit(lambda a: a * 2).lower(x).compile())
  assert (plain.arguments, plain.outputs, plain.aliased) == (4000, 4000, 0)
  donated = memory_fit.Footprint.of(jax.jit(lambda a: a * 2, donate_argnums=0).lower(x).compile())
  assert (donated.arguments, donated.outputs, donated.aliased) == (4000, 4000, 4000)
  assert donated.peak == plain.peak - 4000  # The output is written into the donated buffer.


def test_a_cpu_reports_no_limit_and_auto_compiles_without_remat():
  assert memory_fit.device_limit(jax.devices()) is None
  config = tiny_config()
  config.model.remat_policy = "auto"
  config_lib.validate(config)
  assert build.create_model(config).unet.remat_policy == "none"  # Inference: no backward pass to save on.


def test_auto_picks_the_least_recompute_that_fits_and_a_step_that_cannot_fit_is_a_clear_error(monkeypatch):
  # Five compiles of a small step (~20 s on 2 cores). Nothing fits in 1 byte: every policy tried is reported with XLA's count, and what to change.
  monkeypatch.setattr(memory_fit, "AUTO_ORDER", ("none", "dots"))
  with pytest.raises(memory_fit.DoesNotFit) as raised:
    _compile(_config("auto"), 1, monkeypatch)
  none, dots = raised.value.tried["none"], raised.value.tried["dots"]
  message = str(raised.value)
  assert "remat_policy=none: " in message and "remat_policy=dots: " in message, message
  assert "fake:0 holds 95% of 0.00 GiB" in message and "lower batch_size (now 16)" in message, message
  assert "set model.remat_policy=auto" not in message  # It is what failed.
  # The ground truth of remat: the same state and batch in and out, fewer bytes kept for the backward pass.
  assert (dots.arguments, dots.outputs) == (none.arguments, none.outputs)
  assert dots.temporaries < none.temporaries and dots.peak < none.peak

  # A limit where only dots fits, with auto's 5% headroom: auto takes dots.
  monkeypatch.undo()  # All four policies again.
  limit = int((dots.peak + none.peak) / 2 / memory_fit.AUTO_HEADROOM)
  assert none.peak > memory_fit.AUTO_HEADROOM * limit >= dots.peak
  step_fn, policy = _compile(_config("auto"), limit, monkeypatch)
  assert policy == "dots" and callable(step_fn)

  # A policy given explicitly is checked as it is, against the whole limit, and names the remedies.
  with pytest.raises(UserError) as raised:
    _compile(_config("none"), none.peak - 1, monkeypatch)
  message = str(raised.value)
  assert f"remat_policy=none: {none.describe()}" in message, message
  assert "set model.remat_policy=auto (tries dots, dots_no_batch, full)" in message, message
  assert "compute in bfloat16 (model.dtype)" in message, message
