"""The latent autoencoder seam: Stable Diffusion's AutoencoderKL and how training and sampling use it.

Ground truth: the released kl-f8 parameter count, the original's (0, 1)-padded stride-2 downsampling
written out as a sum, the reparameterized posterior draw, and a frozen subtree that a train step leaves
bit-identical while the U-Net trains.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sd15_unet
from diffusion_jax import build, generation, train_state
from diffusion_jax import train_step as train_step_lib
from diffusion_jax.diffusion import samplers
from diffusion_jax.models import autoencoder as autoencoder_lib
from diffusion_jax.models.autoencoder_kl import AutoencoderKL, Resample


def test_released_kl_f8_has_83_653_863_parameters_and_downsamples_8x():
  vae = AutoencoderKL()
  variables = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables)) == 83_653_863
  # diffusers' Flax names, so released weights map on name by name.
  params = variables["params"]
  assert {"encoder", "decoder", "quant_conv", "post_quant_conv"} == set(params)
  assert set(params["encoder"]["down_blocks_0"]) == {"resnets_0", "resnets_1", "downsamplers_0"}
  assert set(params["encoder"]["mid_block"]["attentions_0"]) == {"group_norm", "query", "key", "value", "proj_attn"}
  moments = jax.eval_shape(lambda v, x: vae.apply(v, x, method=AutoencoderKL.encode), variables,
                           jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32))
  assert [m.shape for m in moments] == [(2, 64, 64, 4)] * 2


def test_downsampling_pads_only_after_like_the_original():
  """y[i, j] = b + Σ_{di, dj} x_pad[2i + di, 2j + dj] · W[di, dj], x_pad = x padded by (0, 1) on each axis."""
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1, 6, 6, 2)), np.float64)
  block = Resample("down")
  variables = nn.unbox(block.init(jax.random.PRNGKey(1), jnp.asarray(x, jnp.float32)))
  variables = jax.tree.map(lambda v: jax.random.normal(jax.random.PRNGKey(2), v.shape), variables)
  got = np.asarray(block.apply(variables, jnp.asarray(x, jnp.float32)))
  w = np.asarray(variables["params"]["conv"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["conv"]["bias"], np.float64)
  x_pad = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  want = np.zeros((1, 3, 3, 2))
  for i in range(3):
    for j in range(3):
      want[0, i, j] = b + np.einsum("hwc,hwco->o", x_pad[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3], w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _small_latent_config():
  """sd15_unet at a CPU size: every option it sets is kept; widths, depths and sizes shrink."""
  config = sd15_unet.get_config()
  config.dataset.name, config.dataset.image_size, config.dataset.channels = "digits", 8, 1
  config.model.vae.block_channels, config.model.vae.layers_per_block, config.model.vae.norm_groups = (8, 16), 1, 4
  config.text.max_length = 32
  te = config.model.text_encoder
  te.width, te.depth, te.num_heads = 32, 1, 4
  u = config.model.unet
  u.channels, u.channel_mult, u.num_res_blocks, u.transformer_depth, u.norm_groups = 16, (1, 2), 1, (1, 0), 4
  u.num_heads = 2
  config.model.dtype = "float32"
  config.batch_size = 8
  config.optimizer.warmup_steps = 1
  config.mesh.shape = (-1, 1, 1)
  return config


def test_posterior_draw_is_mean_plus_sigma_times_noise_and_decode_unscales():
  run = build.build(_small_latent_config())
  params = run.create_state(jax.random.PRNGKey(0))[0].params  # The next test's program: compiled once.
  ae = run.autoencoder
  assert ae.latent_shape((8, 8, 1)) == (4, 4, 4) == run.model.latent_shape
  images = jax.random.randint(jax.random.PRNGKey(1), (64, 8, 8, 1), 0, 256).astype(jnp.uint8)
  mean, logvar = ae.module.apply({"params": params["autoencoder"]}, images.astype(jnp.float32) / 127.5 - 1,
                                 method=AutoencoderKL.encode)
  np.testing.assert_allclose(ae.encode(params, images), 0.18215 * mean, rtol=1e-6)  # No key: the mean.
  z = ae.encode(params, images, jax.random.PRNGKey(2))
  standardized = np.asarray((z / 0.18215 - mean) / jnp.exp(0.5 * logvar)).ravel()  # 4096 draws.
  assert abs(standardized.mean()) < 4 / np.sqrt(standardized.size) and abs(standardized.std() - 1) < 0.05
  decoded = ae.decode(params, z)
  direct = ae.module.apply({"params": params["autoencoder"]}, z / 0.18215, method=AutoencoderKL.decode)
  np.testing.assert_allclose(decoded, np.clip(direct, -1, 1), rtol=1e-6)
  assert decoded.shape == (64, 8, 8, 1)


def test_train_step_leaves_the_frozen_autoencoder_bit_identical_and_samples_decode_to_images():
  config = _small_latent_config()
  run = build.build(config)
  state, shardings = run.create_state(jax.random.PRNGKey(0))
  before = jax.device_get(state.params)
  tokens = run.conditioning.inputs_for(["a handwritten digit 3"] * 8)["tokens"]
  batch = {"image": jax.random.randint(jax.random.PRNGKey(1), (8, 8, 8, 1), 0, 256).astype(jnp.uint8),
           "tokens": jnp.asarray(tokens)}
  step = train_step_lib.make_train_step(run, shardings)
  for _ in range(2):
    state, metrics = step(state, batch)
  after = jax.device_get(state.params)
  assert np.isfinite(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(before["autoencoder"]), jax.tree.leaves(after["autoencoder"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.ema_params)["autoencoder"]), jax.tree.leaves(before["autoencoder"])):
    np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["unet"]), jax.tree.leaves(after["unet"]))]
  assert sum(changed) > len(changed) // 2  # The U-Net trains (zero-initialized outputs move after one step).
  # The sampler runs in latents and decodes to images of the dataset's shape.
  sample = generation.make_sample_fn(run.model, run.schedule, samplers.SamplerOptions(num_steps=3), run.autoencoder)
  inputs = jax.tree.map(jnp.asarray, run.conditioning.inputs_for(["a handwritten digit 3"] * 2))
  null = jax.tree.map(jnp.asarray, run.conditioning.null_inputs(2))
  images = sample(state.params, inputs, null, jnp.full((2,), 3.0), jax.random.PRNGKey(3))
  assert images.shape == (2, 8, 8, 1) and float(jnp.abs(images).max()) <= 1.0


def test_nll_is_refused_for_latent_models():
  from diffusion_jax import inference  # pylint: disable=g-import-not-at-top
  from diffusion_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from diffusion_jax.metrics import sample_quality  # pylint: disable=g-import-not-at-top
  run = build.build(_small_latent_config())
  with pytest.raises(UserError, match="this model diffuses in model.autoencoder='kl' latents"):
    sample_quality.nll_bits_per_dim(inference.LoadedModel(run, {}, 0))
