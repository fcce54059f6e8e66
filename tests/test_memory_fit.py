"""The train step checked against its devices' memory, and remat_policy='auto' (diffusion_jax/memory_fit.py).

A CPU reports no memory limit, so the tests give the search a device limit of their own; the footprints
are XLA's count of the real compiled steps.
"""

import types

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import build, config as config_lib, memory_fit
from diffusion_jax.errors import UserError
from tests.conftest import tiny_config


def _config(remat_policy: str, auto_gradient_accumulation: bool = False, gradient_accumulation_steps: int = 1):
  """A one-level, unconditional smoke U-Net: ~9 s per compile of its step on a 2-core CPU."""
  config = tiny_config()
  config.model.conditioning = "none"
  config.model.unet.channel_mult = (1,)
  config.model.unet.transformer_depth = (1,)
  config.model.unet.mid_transformer_depth = 0
  config.model.remat_policy = remat_policy
  config.auto_gradient_accumulation = auto_gradient_accumulation
  config.gradient_accumulation_steps = gradient_accumulation_steps
  return config


def _compile(config, limit, monkeypatch):
  monkeypatch.setattr(memory_fit, "device_limit", lambda devices: None if limit is None else (limit, "fake:0"))
  run = build.build(config, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  abstract = run.abstract_state()
  step_fn, fit = memory_fit.compile_train_step(run, jax.tree.map(lambda a: a.sharding, abstract), abstract,
                                               memory_fit.agreed_device_limit(run.mesh.devices.flat))
  return step_fn, fit, run, abstract


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
  # Seven compiles of a small step (~18 s on 2 cores). First a limit with room for the state and the batch
  # but not for any policy's temporaries: every policy tried is reported with XLA's count, and what to change.
  monkeypatch.setattr(memory_fit, "AUTO_ORDER", ("none", "dots"))
  _, plain, _, _ = _compile(_config("none"), None, monkeypatch)  # No limit: compiled as configured.
  limit = int((plain.footprint.peak - plain.footprint.temporaries) / memory_fit.AUTO_HEADROOM) + 1
  with pytest.raises(memory_fit.DoesNotFit) as raised:
    _compile(_config("auto"), limit, monkeypatch)
  none, dots = raised.value.tried["none", 1], raised.value.tried["dots", 1]
  assert none == plain.footprint
  message = str(raised.value)
  assert "remat_policy=none: " in message and "remat_policy=dots: " in message, message
  assert f"fake:0 holds 95% of {memory_fit._gib(limit)}" in message, message
  assert "lower batch_size (now 16)" in message and "alone take" not in message, message
  assert "set model.remat_policy=auto" not in message  # It is what failed.
  # The ground truth of remat: the same state and batch in and out, fewer bytes kept for the backward pass.
  assert (dots.arguments, dots.outputs) == (none.arguments, none.outputs)
  assert dots.temporaries < none.temporaries and dots.peak < none.peak

  # A limit where only dots fits, with auto's 5% headroom: auto takes dots.
  monkeypatch.undo()  # All four policies again.
  limit = int((dots.peak + none.peak) / 2 / memory_fit.AUTO_HEADROOM)
  assert none.peak > memory_fit.AUTO_HEADROOM * limit >= dots.peak
  step_fn, fit, _, _ = _compile(_config("auto"), limit, monkeypatch)
  assert (fit.remat_policy, fit.gradient_accumulation_steps, fit.footprint) == ("dots", 1, dots) and callable(step_fn)

  # A policy given explicitly is checked as it is, against the whole limit, and names the remedies.
  with pytest.raises(UserError) as raised:
    _compile(_config("none"), none.peak - 1, monkeypatch)
  message = str(raised.value)
  assert f"remat_policy=none: {none.describe()}" in message, message
  assert "set model.remat_policy=auto (tries dots, dots_no_batch, full)" in message, message
  assert "compute in bfloat16 (model.dtype)" in message, message
  assert "set auto_gradient_accumulation=True" in message, message


def test_auto_gradient_accumulation_takes_the_fewest_micro_batches_that_fit(monkeypatch):
  # Five compiles of a small step (~8 s). The footprints are XLA's count of the real programs.
  _, two, _, _ = _compile(_config("none", gradient_accumulation_steps=2), None, monkeypatch)
  with pytest.raises(memory_fit.DoesNotFit) as raised:  # 1 byte: the state alone does not fit.
    _compile(_config("auto", auto_gradient_accumulation=True), 1, monkeypatch)
  assert list(raised.value.tried) == [("none", 1)]  # Stopped after one compile: no policy or count can help.
  assert "the state in and out and the batch alone take" in str(raised.value)
  assert "remat_policy=none with 1 micro-batch: " in str(raised.value)
  assert "no count of micro-batches (1, 2, 4, 8, 16) fits" in str(raised.value)
  one = raised.value.tried["none", 1]
  # Two micro-batches of 8 keep half the activations: same state in and out, fewer temporaries.
  assert (two.footprint.arguments, two.footprint.outputs) == (one.arguments, one.outputs)
  assert two.footprint.temporaries < one.temporaries

  limit = int((one.peak + two.footprint.peak) / 2 / memory_fit.AUTO_HEADROOM)
  step_fn, fit, run, abstract = _compile(_config("none", auto_gradient_accumulation=True), limit, monkeypatch)
  assert (fit.remat_policy, fit.gradient_accumulation_steps, fit.footprint) == ("none", 2, two.footprint)
  # The step returned is that program (its config splits the batch), for the configured global batch.
  with memory_fit.mesh_lib.activate(run.mesh, run.rules):
    again = step_fn.lower(abstract, memory_fit.abstract_global_batch(run)).compile()
  assert memory_fit.Footprint.of(again) == two.footprint


def test_the_micro_batch_counts_tried_divide_the_batch_per_device():
  config = _config("none", auto_gradient_accumulation=True)
  config.batch_size = 24
  assert memory_fit.accumulation_candidates(config, 2) == (1, 2, 3, 4, 6, 12)
  config.gradient_accumulation_steps = 2
  assert memory_fit.accumulation_candidates(config, 2) == (2, 4, 6, 12)
  config.auto_gradient_accumulation = False
  assert memory_fit.accumulation_candidates(config, 2) == (2,)


@pytest.mark.parametrize("remat_policy, limit, shared_temporaries, expected_calls, expected_fit", [
    # auto: 'none', then 'full'; where full does not fit, the count is left. 2 micro-batches are not compiled:
    # full's 120 bytes of temporaries at 1 would still be 60 at 2, 40 + 60 > 95.
    ("auto", 95, 0, [("none", 1), ("full", 1), ("full", 4), ("dots", 4)], ("dots", 4)),
    # Where only 'full' fits at a count, it is taken there.
    ("auto", 72, 0, [("none", 1), ("full", 1), ("full", 4), ("dots", 4), ("dots_no_batch", 4)], ("full", 4)),
    # An explicit policy keeps its policy and splits the batch.
    ("dots", 95, 0, [("dots", 1), ("dots", 4)], ("dots", 4)),
    # Temporaries that do not shrink with the micro-batch (the accumulated gradients) only make the skipping
    # more cautious: 4 micro-batches (190 bytes) are skipped, 8 (140) compiled.
    ("none", 150, 50, [("none", 1), ("none", 8)], ("none", 8)),
])
def test_the_search_order_compiles_the_least_recompute_and_fewest_micro_batches_first(
    monkeypatch, remat_policy, limit, shared_temporaries, expected_calls, expected_fit):
  """A model of memory instead of compiles: 40 bytes of state and batch, temporaries that a remat policy
  scales and that shrink with the micro-batch (peaks at 1, 2, 4 micro-batches: none 440, 240, 140; dots
  240, 140, 90; dots_no_batch 190, 115, 77; full 160, 100, 70), plus `shared_temporaries` that do not."""
  keep = {"none": 400, "dots": 200, "dots_no_batch": 150, "full": 120}  # Temporaries at one micro-batch.
  calls = []

  def fake_make_train_step(candidate, shardings):
    policy, steps = candidate.model.unet.remat_policy, candidate.config.gradient_accumulation_steps
    calls.append((policy, steps))
    analysis = types.SimpleNamespace(argument_size_in_bytes=40, output_size_in_bytes=40, alias_size_in_bytes=40,
                                     temp_size_in_bytes=shared_temporaries + keep[policy] // steps,
                                     generated_code_size_in_bytes=0)
    compiled = types.SimpleNamespace(memory_analysis=lambda: analysis)
    return types.SimpleNamespace(lower=lambda *args: types.SimpleNamespace(compile=lambda: compiled))

  monkeypatch.setattr(memory_fit, "make_train_step", fake_make_train_step)
  monkeypatch.setattr(memory_fit, "AUTO_HEADROOM", 1.0)
  _, fit, _, _ = _compile(_config(remat_policy, auto_gradient_accumulation=True), limit, monkeypatch)
  assert calls == expected_calls
  assert (fit.remat_policy, fit.gradient_accumulation_steps) == expected_fit
