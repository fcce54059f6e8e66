"""The papers' U-Nets: parameter counts of the released models and each option against its definition.

Counts use jax.eval_shape (no memory): DDPM's CIFAR-10 network has 35,746,307 parameters (the official
implementation's count, "35.7M" in the paper); the Stable Diffusion 1.5 and 2.1 U-Nets of the released
checkpoints have 859,520,964 and 865,910,724.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ddpm_cifar10
from diffusion_jax import build
from diffusion_jax import config as config_lib
from diffusion_jax.errors import UserError
from diffusion_jax.models import unet as unet_lib
from diffusion_jax.models.unet import UNet


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
  # A pooled condition adds a projection only where the option asks for one.
  pooled = jnp.zeros((1, context_width))
  assert _count(unet, *_latents(64, 4), context, None, pooled) == expected
  with_pooled = UNet(4, 320, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, head_dim, 32, 0.0, pooled_projection=True, **kwargs)
  assert _count(with_pooled, *_latents(64, 4), context, None, pooled) == expected + context_width * 1280 + 1280


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
import tensorflow_datasets as tfds
from configs import ddpm_cifar10, iddpm_cifar10
from diffusion_jax import train
from diffusion_jax.data import pipeline
pipeline._prepare = lambda spec, root: None  # mock_data serves the examples; there are no files to check.

def reduced(config, steps, mesh):
  # The paper's config at a CPU size: every option it sets (attention type and heads, AdaGN, learned
  # variances, schedule, optimizer) is kept; only widths, depth, batch and step counts shrink.
  u = config.model.unet
  u.channels, u.channel_mult, u.num_res_blocks, u.norm_groups = 16, (1, 2), 1, 4
  u.transformer_depth = (0, 1)
  config.batch_size, config.num_train_steps, config.log_every_steps = 16, steps, 1
  config.checkpoint_every_steps = config.sample_every_steps = steps
  config.optimizer.warmup_steps = 10
  config.eval_num_examples, config.sampling.num_steps, config.sampling.num_per_prompt = 16, 2, 1
  config.mesh.shape, config.mesh.replicate_indivisible = mesh, True
  return config

with tfds.testing.mock_data(num_examples=64):
  train.train_and_evaluate(reduced(ddpm_cifar10.get_config(), 2, (2, 2, 2)), sys.argv[1] + "/ddpm_sharded")
  train.train_and_evaluate(reduced(iddpm_cifar10.get_config(), 2, (2, 2, 2)), sys.argv[1] + "/iddpm_sharded")
  train.train_and_evaluate(reduced(ddpm_cifar10.get_config(), 200, (-1, 1, 1)), sys.argv[1] + "/ddpm_200")
"""


@pytest.mark.slow
def test_paper_configs_train_sharded_and_ddpm_loss_falls_on_mock_data(tmp_path):
  """Each paper config (reduced) runs sharded steps on a (2, 2, 2) mesh of 8 simulated devices through the
  real pipeline (tfds mock data); ddpm_cifar10 trains 200 steps with a falling loss."""
  import json, os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from tests.test_cli import REPO  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", _MOCK_RUNS, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]

  def losses(name):
    with open(os.path.join(tmp_path, name, "metrics.jsonl")) as f:
      return [r["loss"] for r in map(json.loads, f) if "loss" in r]

  for name in ("ddpm_sharded", "iddpm_sharded"):
    assert len(losses(name)) == 2 and all(np.isfinite(losses(name))), name
  curve = losses("ddpm_200")
  assert len(curve) == 200
  print("ddpm_cifar10 (reduced) loss, first 20 vs last 20 steps:", np.mean(curve[:20]), np.mean(curve[-20:]))
  assert np.mean(curve[-20:]) < 0.7 * np.mean(curve[:20])
