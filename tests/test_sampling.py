"""The real model's sampler: compiled once, guidance scale s = 1 is the conditional model exactly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import build, generation, inference
from diffusion_jax.diffusion import samplers, schedules
from diffusion_jax.errors import UserError
from diffusion_jax.models.autoencoder import PixelSpace
from diffusion_jax.models.conditioning import TextConditioning
from diffusion_jax.parallel import mesh as mesh_lib
from tests.conftest import randomized, tiny_config
from tests.test_models import model_and_params  # pylint: disable=unused-import  (fixture)


@pytest.fixture(scope="module")
def setup(model_and_params):  # pylint: disable=redefined-outer-name
  model, tok, variables = model_and_params
  params = nn.unbox(variables["params"])
  schedule = schedules.make_schedule("cosine", tiny_config().diffusion.num_timesteps)
  fn = generation.make_sample_fn(model, schedule, samplers.SamplerOptions(num_steps=4), PixelSpace())
  return fn, randomized(params), tok


def test_compiled_once_for_new_prompts_scales_and_seeds(setup):
  fn, params, tok = setup
  conditioning = TextConditioning(tok)
  a = generation.generate(fn, params, conditioning, ["a handwritten digit 1", "7"], 3.0, seed=0)
  b = generation.generate(fn, params, conditioning, ["the number two", "9"], [1.0, 5.0], seed=1)
  assert fn._cache_size() == 1  # pylint: disable=protected-access
  assert a.shape == b.shape == (2, 8, 8, 1)
  assert np.abs(a).max() <= 1.0  # DDIM clips x̂_0 to the data range (and PixelSpace.decode clips too).


def test_guidance_one_ignores_the_unconditional_prompt(setup):
  fn, params, tok = setup
  tokens = {"tokens": jnp.asarray(tok.encode_batch(["3", "4"]))}
  key = jax.random.PRNGKey(0)
  ones = jnp.ones((2,))
  empty = {"tokens": jnp.asarray(tok.encode_batch(["", ""]))}
  negative = {"tokens": jnp.asarray(tok.encode_batch(["something else", "8"]))}
  np.testing.assert_array_equal(np.asarray(fn(params, tokens, empty, ones, key)),
                                np.asarray(fn(params, tokens, negative, ones, key)))
  # At s = 3 the unconditional prompt matters (the model is random, so outputs differ).
  threes = jnp.full((2,), 3.0)
  assert not np.allclose(fn(params, tokens, empty, threes, key), fn(params, tokens, negative, threes, key))


def test_sampling_without_guidance_equals_guidance_scale_one(setup, model_and_params):  # pylint: disable=redefined-outer-name
  """guide=False (evaluation's path at scale 1, one forward pass per step) is the doubled batch's s = 1:
  the same conditional prediction, to float rounding of a different batch size."""
  fn, params, tok = setup
  model = model_and_params[0]
  schedule = schedules.make_schedule("cosine", tiny_config().diffusion.num_timesteps)
  conditional = jax.jit(generation.make_sample(model, schedule, samplers.SamplerOptions(num_steps=4), PixelSpace(),
                                               guide=False))
  tokens = {"tokens": jnp.asarray(tok.encode_batch(["3", "the number four"]))}
  empty = {"tokens": jnp.asarray(tok.encode_batch(["", ""]))}
  key = jax.random.PRNGKey(5)
  guided_at_one = np.asarray(fn(params, tokens, empty, jnp.ones((2,)), key))
  np.testing.assert_allclose(np.asarray(conditional(params, tokens, empty, jnp.ones((2,)), key)), guided_at_one,
                             atol=1e-5)
  # Its scales are unused: it is not a guided sampler with another default.
  np.testing.assert_allclose(np.asarray(conditional(params, tokens, empty, jnp.full((2,), 3.0), key)),
                             guided_at_one, atol=1e-5)


def test_bad_sampler_settings_are_clear_errors(setup):
  _, _, _ = setup
  schedule = schedules.make_schedule("cosine", 100)
  with pytest.raises(UserError, match="unknown sampler 'euler'"):
    generation.make_sample_fn(None, schedule, samplers.SamplerOptions(sampler="euler"), None)
  with pytest.raises(UserError, match=r"steps=500 must be in \[1, 100\]"):
    generation.make_sample_fn(None, schedule, samplers.SamplerOptions(num_steps=500), None)


def test_compile_generate_compiles_the_program_that_generate_then_reuses(model_and_params):  # pylint: disable=redefined-outer-name
  """Training compiles its grid sampler ahead (while the train step compiles): the later call must not compile."""
  model, tok, variables = model_and_params
  params = randomized(nn.unbox(variables["params"]))
  schedule = schedules.make_schedule("cosine", tiny_config().diffusion.num_timesteps)
  fn = generation.make_sample_fn(model, schedule, samplers.SamplerOptions(num_steps=3), PixelSpace())
  conditioning, requests = TextConditioning(tok), ["3", "the number four", ""]
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":  # Also a persistent-cache hit.
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    generation.compile_generate(fn, abstract, conditioning, requests, negative_prompt="blurry")
    ahead = len(compiles)
    images = generation.generate(fn, params, conditioning, requests, 3.0, seed=0, negative_prompt="blurry")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert ahead >= 1 and len(compiles) == ahead
  assert images.shape == (3, 8, 8, 1)


def test_the_sample_command_runs_the_program_training_compiled_for_its_grids(twenty_steps):
  """`sample` (inference.generate) lays the parameters out and activates the mesh as training does for its
  grids, so its program is training's: the persistent compilation cache then finds it instead of a second
  compile (here, in one process: the same jitted function must not compile again)."""
  config, workdir, _ = twenty_steps
  loaded, train_run = inference.load(workdir), build.build(config)
  run, negative = loaded.run, config.sampling.negative_prompt
  fn = generation.make_sample_fn(run.model, run.schedule, generation.sampler_options(config), run.autoencoder)
  rows = generation.grid_requests(config, run.dataset, run.conditioning.kind)
  requests = [r for r in rows for _ in range(config.sampling.num_per_prompt)]
  compiles = []

  def listener(event, duration, fun_name="", **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration" and fun_name == "jit(sample)":
      compiles.append(fun_name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    abstract = train_run.abstract_state()
    with mesh_lib.activate(train_run.mesh, train_run.rules):  # What training does at start-up.
      generation.compile_generate(fn, abstract.ema_params, train_run.conditioning, requests, negative)
    images = inference.generate(run, fn, loaded.params, requests, 3.0, seed=1, negative_prompt=negative)
    assert compiles == ["jit(sample)"]
    unplaced = generation.generate(fn, loaded.params, run.conditioning, requests, 3.0, seed=1, negative_prompt=negative)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == ["jit(sample)"] * 2  # Host parameters without the mesh: another program.
  np.testing.assert_allclose(images, unplaced, atol=1e-5)  # Computing the same images.
  assert images.shape == (len(requests),) + run.dataset.image_shape
