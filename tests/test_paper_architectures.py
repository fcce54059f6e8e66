"""The papers' U-Nets: parameter counts of the released models and each option against its definition.

Counts use jax.eval_shape (no memory): DDPM's CIFAR-10 network has 35,746,307 parameters (the official
implementation's count, "35.7M" in the paper); the Stable Diffusion 1.5 and 2.1 U-Nets of the released
checkpoints have 859,520,964 and 865,910,724, their AutoencoderKL 83,653,863; ADM's class-conditional
ImageNet-64 network "296M".
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cfg_imagenet64, ddpm_cifar10, sd15_unet, sd21_unet
from diffusion_jax import build
from diffusion_jax import config as config_lib
from diffusion_jax.errors import UserError
from diffusion_jax.models import unet as unet_lib
from diffusion_jax.models.unet import UNet
from tests.conftest import xla_flags


def _count(module, *inputs) -> int:
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables))


def _latents(size, channels):
  return jnp.zeros((1, size, size, channels)), jnp.zeros((1,), jnp.int32)


def test_ddpm_cifar10_config_builds_the_papers_network():
  config = ddpm_cifar10.get_config()
  config_lib.validate(config)
  model = build.create_model(config)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *model.dummy_inputs())["params"])
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  assert round(count / 1e5) == 357  # "35.7M" in the paper (35,746,307 is 0.13% above 35.7e6 exactly).
  assert count == 35_746_307  # The official implementation's count.
  assert list(params) == ["unet"]  # Unconditional: no text encoder, no class embedding.


def test_ddpm_cifar10_config_matches_the_paper():
  """Ho et al. 2020, §4 and appendix B."""
  c = ddpm_cifar10.get_config()
  u = c.model.unet
  assert (c.dataset.name, c.dataset.image_size, c.dataset.random_flip, c.model.conditioning) == (
      "cifar10", 32, True, "none")
  assert (u.channels, tuple(u.channel_mult), u.num_res_blocks, u.dropout) == (128, (1, 2, 2, 2), 2, 0.1)
  resolutions = [32 // 2 ** level for level, depth in enumerate(u.transformer_depth) if depth]
  assert resolutions == [16] and u.mid_transformer_depth == 1
  assert (u.attention_type, u.num_heads, u.norm_groups) == ("self", 1, 32)
  d = c.diffusion
  assert (d.num_timesteps, d.beta_schedule, d.prediction_type, d.loss_weighting) == (1000, "linear", "eps", "uniform")
  o = c.optimizer
  assert (o.learning_rate, o.warmup_steps, o.schedule, o.grad_clip_norm, o.ema_decay, o.weight_decay) == (
      2e-4, 5000, "constant", 1.0, 0.9999, 0.0)
  assert (c.batch_size, c.num_train_steps) == (128, 800_000)
  assert (c.sampling.sampler, c.sampling.num_steps, c.sampling.ddpm_variance) == ("ddpm", 1000, "large")


@pytest.mark.parametrize("version, context_width, kwargs, expected", [
    ("1.5", 768, dict(use_linear_projection=False, num_heads=8, head_dim=40), 859_520_964),
    ("2.1", 1024, dict(use_linear_projection=True, num_heads=0, head_dim=64), 865_910_724),
])
def test_stable_diffusion_unets_have_the_released_parameter_counts(version, context_width, kwargs, expected):
  """320 channels × (1, 2, 4, 4), 2 ResBlocks, transformers at the first three levels and in the middle,
  cross-attention to 77 tokens of `context_width`, 64×64×4 latents, no pooled projection."""
  head_dim = kwargs.pop("head_dim")
  unet = UNet(4, 320, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, head_dim, 32, 0.0, pooled_projection=False, **kwargs)
  context = jnp.zeros((1, 77, context_width))
  assert _count(unet, *_latents(64, 4), context) == expected, version
  # A pooled condition adds a projection only where the option asks for one; without it, only a
  # condition of the timestep embedding's width (ADM's label embedding) can be added.
  pooled = jnp.zeros((1, context_width))
  with pytest.raises(UserError, match=r"pooled \(added without a projection\) has shape \(1, %d\); "
                     r"expected \(1, 1280\)" % context_width):
    _count(unet, *_latents(64, 4), context, None, pooled)
  assert _count(unet, *_latents(64, 4), context, None, jnp.zeros((1, 1280))) == expected
  with_pooled = UNet(4, 320, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, head_dim, 32, 0.0, pooled_projection=True, **kwargs)
  assert _count(with_pooled, *_latents(64, 4), context, None, pooled) == expected + context_width * 1280 + 1280


def _config_params(config):
  """{subtree: parameter count} of the config's model, by eval_shape."""
  from diffusion_jax.data import registry  # pylint: disable=g-import-not-at-top
  # The SD configs leave the (512×512 text-image) dataset to the user; a text model's network does not
  # depend on it.
  dataset = None if config.dataset.name else registry.get("digits")
  model = build.create_model(config, dataset)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *model.dummy_inputs())["params"])
  return model, {k: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(v)) for k, v in params.items()}


@pytest.mark.parametrize("module, unet_count, context_width", [
    (sd15_unet, 859_520_964, 768), (sd21_unet, 865_910_724, 1024)])
def test_sd_configs_build_the_released_unet_and_autoencoder(module, unet_count, context_width):
  config = module.get_config()
  model, counts = _config_params(config)
  assert counts["unet"] == unet_count  # The released U-Net's count, from the config itself.
  assert counts["autoencoder"] == 83_653_863  # The released kl-f8 AutoencoderKL.
  assert model.latent_shape == (64, 64, 4)  # 512×512×3 images, downsampled 8×.
  assert model.frozen_subtrees == ("autoencoder",)
  assert (config.text.max_length, config.model.text_encoder.width) == (77, context_width)
  # With a dataset of the config's shape the rest of the config validates (here a stand-in whose
  # captions come from class names; the config's own dataset is the user's).
  config.dataset.name, config.dataset.image_size = "imagenet_resized/64x64", 64
  config_lib.validate(config)
  with pytest.raises(UserError, match=r"config.dataset.name is empty: this config needs a dataset of "
                                      r"512×512×3 images"):
    config_lib.validate(module.get_config())


def test_sd_configs_match_the_released_recipe():
  """CompVis v1 / Stability v2 configs and model cards."""
  c15, c21 = sd15_unet.get_config(), sd21_unet.get_config()
  for c in (c15, c21):
    u, d, o = c.model.unet, c.diffusion, c.optimizer
    assert (u.channels, tuple(u.channel_mult), u.num_res_blocks, tuple(u.transformer_depth), u.mid_transformer_depth
            ) == (320, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1)  # attention_resolutions 4, 2, 1.
    assert (u.attention_type, u.pooled_projection, u.norm_groups, u.dropout) == ("transformer", False, 32, 0.0)
    assert (c.model.autoencoder, tuple(c.model.vae.block_channels), c.model.vae.latent_channels,
            c.model.vae.scale_factor) == ("kl", (128, 256, 512, 512), 4, 0.18215)
    assert (d.num_timesteps, d.beta_schedule, d.prediction_type, d.p_uncond) == (1000, "scaled_linear", "eps", 0.1)
    assert (o.learning_rate, o.warmup_steps, o.schedule, c.batch_size) == (1e-4, 10_000, "constant", 2048)
  assert (c15.model.unet.num_heads, c15.model.unet.use_linear_projection) == (8, False)
  assert (c21.model.unet.num_heads, c21.model.unet.head_dim, c21.model.unet.use_linear_projection) == (0, 64, True)
  assert c15.num_train_steps == 595_000


def test_cfg_imagenet64_is_adm_with_a_null_label():
  """Dhariwal & Nichol 2021 Table 11 (ImageNet 64) and Ho & Salimans 2022 §4."""
  c = cfg_imagenet64.get_config()
  config_lib.validate(c)
  u = c.model.unet
  assert (c.dataset.name, c.dataset.image_size, c.model.conditioning) == ("imagenet_resized/64x64", 64, "class")
  assert (u.channels, tuple(u.channel_mult), u.num_res_blocks, u.head_dim, u.num_heads, u.dropout) == (
      192, (1, 2, 3, 4), 3, 64, 0, 0.1)
  resolutions = [64 // 2 ** level for level, depth in enumerate(u.transformer_depth) if depth]
  assert resolutions == [32, 16, 8] and u.mid_transformer_depth == 1
  assert (u.attention_type, u.scale_shift_norm, u.resblock_updown) == ("self", True, True)
  d, o = c.diffusion, c.optimizer
  assert (d.num_timesteps, d.beta_schedule, d.learn_sigma, d.vlb_weight, d.p_uncond) == (1000, "cosine", True, 0.001, 0.1)
  assert (o.learning_rate, c.batch_size, o.ema_decay, c.num_train_steps) == (3e-4, 2048, 0.9999, 400_000)
  assert c.sampling.guidance_scale == 1.1  # w = 0.1 (FID 1.55): s = 1 + w.
  _, counts = _config_params(c)
  # ADM: the U-Net plus a 1000 × 768 label table added to the timestep embedding ("296M"); guidance adds
  # the null label's row.
  assert counts["class_embedding"] == 1001 * 768
  adm = counts["unet"] + 1000 * 768
  assert adm == 295_904_454 and round(adm / 1e6) == 296
  bad = cfg_imagenet64.get_config()
  bad.model.class_embedding_width = 128
  with pytest.raises(UserError, match=r"class_embedding_width=128 must be the timestep embedding's width "
                                      r"4·unet.channels=768 when unet.pooled_projection=False"):
    config_lib.validate(bad)


def test_imagenet64_class_names_follow_tfds_label_order():
  """TFDS imagenet_resized numbers classes in its own order, not imagenet2012's sorted WordNet IDs."""
  import importlib.resources  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import imagenet64, registry  # pylint: disable=g-import-not-at-top
  tfds_ids = importlib.resources.files("tensorflow_datasets").joinpath(
      "image_classification/imagenet_resized_labels.txt").read_text().split()
  assert list(imagenet64.WORDNET_IDS) == tfds_ids and len(set(imagenet64.CLASS_NAMES)) == 1000
  spec = registry.get("imagenet_resized/64x64")
  assert spec.image_shape == (64, 64, 3) and spec.num_classes == 1000 and spec.file_stem == "imagenet_resized-64x64"
  assert imagenet64.CLASS_NAMES[tfds_ids.index("n02110063")] == "malamute"
  assert spec.dataset_dir("/d").endswith("/d/imagenet_resized/64x64/" + str(spec.builder_cls().VERSION))


def test_attention_block_is_ddpms_self_attention():
  """GN → q, k, v = W·h + b → softmax(q kᵀ / √d) v per head → W_o·(…) + b_o, + x; checked in numpy."""
  block = unet_lib.AttentionBlock(depth=1, head_dim=0, norm_groups=4, use_linear_projection=False, num_heads=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  variables = nn.unbox(block.init(jax.random.PRNGKey(1), x, None, None))
  # The output projection starts at zero (the block starts as the identity); give it weights to test.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: jax.random.normal(jax.random.PRNGKey(len(str(path))), v.shape) * 0.3
      if "out" in jax.tree_util.keystr(path) else v, variables)
  got = np.asarray(block.apply(variables, x, None, None))
  p = jax.tree.map(np.asarray, variables["params"])
  xs = np.asarray(x, np.float64)
  groups = xs.reshape(2, 16, 4, 2)  # 4 groups of 2 channels over 16 positions.
  mean, var = groups.mean(axis=(1, 3), keepdims=True), groups.var(axis=(1, 3), keepdims=True)
  h = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(2, 16, 8) * p["norm_0"]["scale"] + p["norm_0"]["bias"]
  q, k, v = (h @ p[f"{n}_0"]["kernel"] + p[f"{n}_0"]["bias"] for n in ("query", "key", "value"))
  heads = lambda y: y.reshape(2, 16, 2, 4).transpose(0, 2, 1, 3)
  logits = heads(q) @ heads(k).transpose(0, 1, 3, 2) / np.sqrt(4)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attended = (weights @ heads(v)).transpose(0, 2, 1, 3).reshape(2, 16, 8)
  want = xs + (attended @ p["out_0"]["kernel"] + p["out_0"]["bias"]).reshape(2, 4, 4, 8)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_scale_shift_norm_is_adms_adagn():
  """ADM: h ← conv_2(SiLU(GN(h)·(1 + scale) + shift)), with (scale, shift) = split(W·SiLU(temb) + b)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  temb = jax.random.normal(jax.random.PRNGKey(1), (2, 16))
  block = unet_lib.ResBlock(8, norm_groups=4, dropout=0.0, scale_shift_norm=True)
  variables = nn.unbox(block.init(jax.random.PRNGKey(2), x, temb, False))
  assert variables["params"]["time_proj"]["kernel"].shape == (16, 16)  # (scale, shift) per channel.
  variables = jax.tree_util.tree_map_with_path(  # Non-zero conv_2 and embedding weights to test with.
      lambda path, v: jax.random.normal(jax.random.PRNGKey(7), v.shape) * 0.5
      if any(n in jax.tree_util.keystr(path) for n in ("conv_2", "time_proj")) else v, variables)
  _, state = block.apply(variables, x, temb, False, capture_intermediates=True)
  inter = state["intermediates"]
  p = jax.tree.map(np.asarray, variables["params"])
  h = np.asarray(inter["conv_1"]["__call__"][0], np.float64)
  g = h.reshape(2, 16, 4, 2)
  normed = ((g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-5))
  normed = normed.reshape(2, 4, 4, 8) * p["norm_2"]["scale"] + p["norm_2"]["bias"]
  np.testing.assert_allclose(inter["norm_2"]["__call__"][0], normed, rtol=1e-4, atol=1e-5)
  emb = np.asarray(jax.nn.silu(temb), np.float64) @ p["time_proj"]["kernel"] + p["time_proj"]["bias"]
  scale, shift = emb[:, None, None, :8], emb[:, None, None, 8:]
  conv_2_input = jax.nn.silu(jnp.asarray(normed * (1 + scale) + shift, jnp.float32))
  want = unet_lib.layers.Conv(8).apply({"params": variables["params"]["conv_2"]}, conv_2_input)
  np.testing.assert_allclose(inter["conv_2"]["__call__"][0], want, rtol=1e-4, atol=1e-4)


def test_resblock_updown_resamples_both_paths_like_adm():
  """With the final conv at its zero init only the skip path remains: 2×2 average pool down, nearest up."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 8))
  temb = jax.random.normal(jax.random.PRNGKey(1), (2, 16))
  down = unet_lib.ResBlock(8, norm_groups=4, dropout=0.0, resample="down")
  out = down.apply(down.init(jax.random.PRNGKey(3), x, temb, False), x, temb, False)
  np.testing.assert_allclose(out, x.reshape(2, 4, 2, 4, 2, 8).mean(axis=(2, 4)), rtol=1e-6, atol=1e-6)
  up = unet_lib.ResBlock(8, norm_groups=4, dropout=0.0, resample="up")
  out = up.apply(up.init(jax.random.PRNGKey(4), x, temb, False), x, temb, False)
  np.testing.assert_allclose(out, np.repeat(np.repeat(x, 2, 1), 2, 2), rtol=1e-6)
  adm = UNet(6, 32, (1, 2), 1, (0, 1), 1, 16, 8, 0.0, False, attention_type="self", scale_shift_norm=True,
             resblock_updown=True)
  params = jax.eval_shape(lambda: adm.init(jax.random.PRNGKey(0), *_latents(16, 3)))["params"]
  assert "down_0_downsample" in params and "norm_1" in params["down_0_downsample"]  # A ResBlock, not a conv.
  assert "up_1_upsample" in params and "time_proj" in params["up_1_upsample"]


def test_self_attention_with_text_conditioning_is_refused():
  config = ddpm_cifar10.get_config()
  config.model.conditioning = "text"
  with pytest.raises(UserError, match="attention_type='self' has no cross-attention"):
    config_lib.validate(config)
  config = ddpm_cifar10.get_config()
  config.model.unet.num_heads = 3
  with pytest.raises(UserError, match=r"num_heads=3 does not divide the 256 channels of level 1"):
    config_lib.validate(config)


_MOCK_RUNS = r"""
import json, os, sys
import jax
import tensorflow_datasets as tfds
from configs import cfg_imagenet64, ddpm_cifar10, iddpm_cifar10, sd15_unet, sd21_unet
from diffusion_jax import build, train, train_step
from diffusion_jax.data import pipeline
from diffusion_jax.parallel import mesh as mesh_lib
pipeline._prepare = lambda spec, root: None  # mock_data serves the examples; there are no files to check.

def reduced(config, steps, mesh):
  # The paper's config at a CPU size: every option it sets (attention type and heads, AdaGN, learned
  # variances, latents, schedule, optimizer) is kept; only widths, depth, batch and step counts shrink.
  u = config.model.unet
  u.channels, u.channel_mult, u.num_res_blocks, u.norm_groups = 16, (1, 2), 1, 4
  u.transformer_depth, u.head_dim = (0, 1), 8
  u.num_heads = min(u.num_heads, 2)
  config.model.class_embedding_width = 4 * u.channels
  config.batch_size, config.num_train_steps, config.log_every_steps = 16, steps, 1
  config.checkpoint_every_steps = config.sample_every_steps = steps
  config.optimizer.warmup_steps = 10
  config.eval_num_examples, config.sampling.num_steps, config.sampling.num_per_prompt = 16, 2, 1
  config.mesh.shape, config.mesh.replicate_indivisible = mesh, True
  config.model.dtype = "float32"
  return config

def reduced_sd(module):
  # The SD recipe on 8×8 digits: a 2-level AutoencoderKL gives 4×4×4 latents, a small text encoder.
  config = reduced(module.get_config(), 2, (2, 2, 2))
  config.dataset.name, config.dataset.image_size, config.dataset.channels = "digits", 8, 1
  config.model.vae.block_channels, config.model.vae.layers_per_block, config.model.vae.norm_groups = (8, 16), 1, 4
  config.model.unet.transformer_depth = (1, 0)
  config.text.max_length = 32
  te = config.model.text_encoder
  te.width, te.depth, te.num_heads = 32, 1, 4
  return config

def sharded_steps(config, steps=2):
  # The training job's own pieces (build, sharded state, pipeline, jitted step), without its checkpoints,
  # sample grids and evaluations: their compilation would triple the time, and other tests cover them.
  run = build.build(config)
  state, shardings = run.create_state(jax.random.PRNGKey(0))
  train_iter = pipeline.create_train_iterator(config, tokenizer=getattr(run.conditioning, "tokenizer", None))
  step, keys = train_step.make_train_step(run, shardings), ("image",) + tuple(run.conditioning.input_keys)
  losses = []
  with mesh_lib.activate(run.mesh, run.rules):
    for _ in range(steps):
      state, metrics = step(state, train_step.global_batch(next(train_iter), run.mesh, keys))
      losses.append(float(metrics["loss"]))
  kinds = sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)})
  return {"losses": losses, "latent_shape": list(run.model.latent_shape), "param_specs": kinds,
          "mesh": dict(run.mesh.shape)}

with tfds.testing.mock_data(num_examples=64):
  out = sys.argv[1]
  results = {name: sharded_steps(config) for name, config in [
      ("ddpm_cifar10", reduced(ddpm_cifar10.get_config(), 2, (2, 2, 2))),
      ("iddpm_cifar10", reduced(iddpm_cifar10.get_config(), 2, (2, 2, 2))),
      ("cfg_imagenet64", reduced(cfg_imagenet64.get_config(), 2, (2, 2, 2))),
      ("sd15_unet", reduced_sd(sd15_unet)), ("sd21_unet", reduced_sd(sd21_unet))]}
  with open(out + "/sharded.json", "w") as f:
    json.dump(results, f)
  train.train_and_evaluate(reduced(ddpm_cifar10.get_config(), 200, (-1, 1, 1)), out + "/ddpm_200")
"""


@pytest.mark.slow
def test_paper_configs_train_sharded_and_ddpm_loss_falls_on_mock_data(tmp_path):
  """Each paper config (reduced) runs sharded steps on a (2, 2, 2) mesh of 8 simulated devices through the
  real pipeline (tfds mock data; the SD configs on digits, through a small AutoencoderKL); ddpm_cifar10
  trains 200 steps (the whole training job) with a falling loss."""
  import json, os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from tests.test_cli import REPO  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
  proc = subprocess.run([sys.executable, "-c", _MOCK_RUNS, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]

  def losses(name):
    with open(os.path.join(tmp_path, name, "metrics.jsonl")) as f:
      return [r["loss"] for r in map(json.loads, f) if "loss" in r]

  with open(os.path.join(tmp_path, "sharded.json")) as f:
    sharded = json.load(f)
  assert sorted(sharded) == ["cfg_imagenet64", "ddpm_cifar10", "iddpm_cifar10", "sd15_unet", "sd21_unet"]
  for name, result in sharded.items():
    assert result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}, name
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"])), name
    # Parameters really are split over the fsdp and tensor axes, not only replicated.
    assert any("fsdp" in spec for spec in result["param_specs"]), (name, result["param_specs"])
    assert any("tensor" in spec for spec in result["param_specs"]), (name, result["param_specs"])
  assert sharded["sd15_unet"]["latent_shape"] == [4, 4, 4]  # 8×8 digits through the 2-level AutoencoderKL.
  assert sharded["cfg_imagenet64"]["latent_shape"] == [64, 64, 3]
  curve = losses("ddpm_200")
  assert len(curve) == 200
  print("ddpm_cifar10 (reduced) loss, first 20 vs last 20 steps:", np.mean(curve[:20]), np.mean(curve[-20:]))
  assert np.mean(curve[-20:]) < 0.7 * np.mean(curve[:20])
