"""The conditioning seam (text, class, none), the frozen-subtree seam and the train step's import footprint.

Exact checks: with guidance scale 1 a sample cannot depend on the null condition (the guided output is
c + 0·(c − u)); with p_uncond = 1 the training loss equals the loss of the same batch with every
condition replaced by its null value; an unconditional sampler runs one forward pass per step.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import build, config as config_lib, generation, train, train_state
from diffusion_jax import train_step as train_step_lib
from diffusion_jax.data import pipeline
from diffusion_jax.diffusion import samplers, schedules
from diffusion_jax.models import conditioning
from tests.conftest import perturbed, tiny_config, xla_flags
from tests.test_cli import _assert_one_line_error, _run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, kind):
  config = tiny_config(data_dir)
  config.model.conditioning = kind
  return config


def _one_device(config):
  run = build.build(config, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  state, shardings = train_state.create_train_state(jax.random.PRNGKey(0), run.model, run.optimizer, run.mesh,
                                                    run.rules)
  return run, state, shardings


def _batch(run, config):
  local = next(pipeline.create_train_iterator(config, tokenizer=getattr(run.conditioning, "tokenizer", None)))
  return {k: jnp.asarray(local[k]) for k in ("image",) + tuple(run.conditioning.input_keys)}


@pytest.mark.parametrize("kind, subtrees", [("text", {"text_encoder", "unet"}), ("class", {"class_embedding", "unet"}),
                                            ("none", {"unet"})])
def test_each_kind_has_its_parameters_and_no_cross_attention_without_text(data_dir, kind, subtrees):
  run = build.build(_config(data_dir, kind), mesh_shape=(1, 1, 1))
  params = jax.eval_shape(lambda: run.model.init(jax.random.PRNGKey(0), *run.model.dummy_inputs()))["params"]
  assert set(params) == subtrees
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert any("cross_attn" in p for p in paths) == (kind == "text")
  assert any("pooled_text_proj" in p for p in paths) == (kind != "none")
  assert run.conditioning.kind == kind == run.model.conditioning_kind


@pytest.mark.parametrize("kind", ["text", "class"])
def test_p_uncond_one_trains_exactly_on_the_null_condition(data_dir, kind):
  config = _config(data_dir, kind)
  run, state, shardings = _one_device(config)
  # Zero-initialized output layers make a fresh model ignore its condition: perturb the parameters first.
  # The step donates its input on an accelerator: start each call from a host copy.
  state = jax.device_get(state.replace(params=perturbed(state.params)))
  batch = _batch(run, config)
  null = run.conditioning.null_inputs(batch["image"].shape[0])
  nulled = dict(batch, **{k: jnp.asarray(v) for k, v in null.items()})
  losses = []
  for p_uncond, b in ((1.0, batch), (0.0, nulled)):
    config.diffusion.p_uncond = p_uncond
    step = train_step_lib.make_train_step(dataclasses.replace(run, config=config), shardings)
    _, metrics = step(jax.device_put(state, shardings), b)
    losses.append(float(metrics["loss"]))
  assert losses[0] == losses[1]
  config.diffusion.p_uncond = 0.0
  step = train_step_lib.make_train_step(dataclasses.replace(run, config=config), shardings)
  assert float(step(jax.device_put(state, shardings), batch)[1]["loss"]) != losses[0]  # The condition matters.


def test_drop_to_null_replaces_exactly_the_dropped_examples():
  inputs = {"label": jnp.array([3, 1, 4, 1], jnp.int32), "tokens": jnp.arange(8).reshape(4, 2)}
  null = {"label": jnp.array([10], jnp.int32), "tokens": jnp.array([[0, 0]])}
  out = conditioning.drop_to_null(inputs, null, jnp.array([True, False, True, False]))
  np.testing.assert_array_equal(out["label"], [3, 10, 4, 10])
  np.testing.assert_array_equal(out["tokens"], [[0, 1], [0, 0], [4, 5], [0, 0]])


@pytest.mark.parametrize("kind, requests", [("text", ["a handwritten digit 3", "7"]), ("class", [3, 7])])
def test_guidance_scale_one_ignores_the_null_condition(data_dir, kind, requests):
  run, state, _ = _one_device(_config(data_dir, kind))
  params = perturbed(state.params)  # So that the condition really changes the prediction.
  fn = generation.make_sample_fn(run.model, run.schedule, samplers.SamplerOptions(num_steps=4), run.autoencoder)
  inputs = jax.tree.map(jnp.asarray, run.conditioning.inputs_for(requests))
  null = jax.tree.map(jnp.asarray, run.conditioning.null_inputs(2))
  other_null = jax.tree.map(lambda a: a, inputs)  # Another "unconditional" branch: the requests themselves.
  sample = lambda n, s: np.asarray(fn(params, inputs, n, jnp.full((2,), s), jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(sample(null, 1.0), sample(other_null, 1.0))
  assert not np.array_equal(sample(null, 3.0), sample(other_null, 3.0))


def test_unconditional_sampling_runs_one_forward_pass_per_step():
  schedule = schedules.schedule_from_config(tiny_config())
  batch_sizes = []

  def denoise(x, t, cond):
    batch_sizes.append(x.shape[0])
    return jnp.zeros_like(x)

  x_T = jnp.ones((3, 4, 4, 1))
  samplers.sample(denoise, schedule, x_T, {}, None, jnp.ones((3,)), jax.random.PRNGKey(0),
                  samplers.SamplerOptions(num_steps=5))
  assert batch_sizes and set(batch_sizes) == {3}  # Not the doubled batch of guidance.


def test_frozen_subtrees_do_not_change(data_dir):
  config = _config(data_dir, "text")
  run = build.build(config, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  run = dataclasses.replace(run, optimizer=train_state.create_optimizer(config, frozen=("text_encoder",)))
  state, shardings = train_state.create_train_state(jax.random.PRNGKey(0), run.model, run.optimizer, run.mesh,
                                                    run.rules)
  before = jax.device_get(state.params)
  step, batch = train_step_lib.make_train_step(run, shardings), _batch(run, config)
  for _ in range(3):  # The first step has learning rate 0 (warm-up starts at 0).
    state, _ = step(state, batch)
  after = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(after["text_encoder"]), jax.tree.leaves(before["text_encoder"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after["unet"]),
                                                       jax.tree.leaves(before["unet"])))


def test_the_train_step_model_and_sampler_import_without_the_data_packages():
  """A machine with only jax/flax/optax (GPU images): build, one train step and one sample, with grain,
  TFDS, TensorFlow and clu made unimportable."""
  script = r"""
import sys
BLOCKED = ("grain", "tensorflow_datasets", "tensorflow", "clu", "array_record")
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
import jax, jax.numpy as jnp, numpy as np
from configs import smoke
from diffusion_jax import build, generation, train_state, train_step
for kind in ("text", "class", "none"):
  config = smoke.get_config()
  config.model.conditioning = kind
  run = build.build(config, mesh_shape=(1, 1, 1))
  if kind != "text":  # Every kind builds from the same modules; one kind trains and samples (cost: compiles).
    assert run.conditioning.kind == kind
    continue
  state, shardings = train_state.create_train_state(jax.random.PRNGKey(0), run.model, run.optimizer, run.mesh, run.rules)
  images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
  requests = {"text": ["a handwritten digit 3"] * 16, "class": [3] * 16, "none": [None] * 16}[kind]
  batch = {"image": jnp.asarray(images), **{k: jnp.asarray(v) for k, v in run.conditioning.inputs_for(requests).items()}}
  state, metrics = train_step.make_train_step(run, shardings)(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  fn = generation.make_sample_fn(run.model, run.schedule, generation.sampler_options(config, num_steps=2),
                                 run.autoencoder)
  out = generation.generate(fn, state.ema_params, run.conditioning, requests[:2], 3.0, seed=0)
  assert out.shape == (2, 8, 8, 1)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("OK")
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def _config_only_workdir(tmp_path, kind):
  config = config_lib.get_default_config()
  config.model.conditioning = kind
  if kind == "none":
    config.sampling.guidance_scale = 1.0
  workdir = tmp_path / kind
  workdir.mkdir()
  (workdir / "config.json").write_text(config_lib.to_json(config))
  return workdir


def test_sample_flags_must_fit_the_conditioning(tmp_path):
  text, klass, none = (_config_only_workdir(tmp_path, k) for k in ("text", "class", "none"))
  _assert_one_line_error(*_run("diffusion_jax.sample", f"--workdir={text}", "--labels=3"),
                         "--labels does not apply", "'text'", "--prompts")
  _assert_one_line_error(*_run("diffusion_jax.sample", f"--workdir={klass}", "--prompts=a 3"),
                         "--prompts does not apply", "'class'", "--labels")
  _assert_one_line_error(*_run("diffusion_jax.sample", f"--workdir={klass}", "--labels=3,12"),
                         "labels [12] are out of range", "0 to 9")
  _assert_one_line_error(*_run("diffusion_jax.sample", f"--workdir={klass}", "--labels=3,x"), "give integers")
  _assert_one_line_error(*_run("diffusion_jax.sample", f"--workdir={none}", "--labels=3"),
                         "--labels does not apply", "only --num_per_prompt")
  _assert_one_line_error(*_run("diffusion_jax.sample", f"--workdir={klass}", "--negative_prompt=x"),
                         "--negative_prompt needs a text model")


@pytest.mark.parametrize("kind", ["class", "none"])
def test_sample_cli_for_class_and_unconditional_models(data_dir, tmp_path, kind):
  config = _config(data_dir, kind)
  config.num_train_steps, config.checkpoint_every_steps, config.sample_every_steps = 2, 2, 2
  config.eval_num_examples = 16
  if kind == "none":
    config.diffusion.p_uncond, config.sampling.guidance_scale = 0.0, 1.0
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  assert os.path.isfile(os.path.join(workdir, "samples", "step_2.png"))
  args = ["--labels=3,7,7", "--num_per_prompt=2"] if kind == "class" else ["--num_per_prompt=5"]
  out = tmp_path / "s.npz"
  rc, err = _run("diffusion_jax.sample", f"--workdir={workdir}", "--steps=2", f"--out={out}", *args)
  assert rc == 0, err[-20:]
  result = np.load(out)
  if kind == "class":
    np.testing.assert_array_equal(result["labels"], [3, 3, 7, 7, 7, 7])
    assert result["images"].shape == (6, 8, 8, 1) and "prompts" not in result
  else:
    assert result["images"].shape == (5, 8, 8, 1) and "labels" not in result and "prompts" not in result
    assert float(result["guidance_scale"]) == 1.0


@pytest.mark.slow
def test_cifar10_trains_on_mock_data_with_flips_over_8_devices(tmp_path):
  """A few steps of class-conditional cifar10 (tfds mock data) through the real pipeline, flips on,
  on a (2, 2, 2) mesh of 8 simulated devices."""
  script = r"""
import json, os, sys
import tensorflow_datasets as tfds
from configs import cifar10
from diffusion_jax import train
from diffusion_jax.data import pipeline
pipeline._prepare = lambda spec, root: None  # mock_data serves the examples; there are no files to check.
config = cifar10.get_config()
config.model.unet.channels, config.model.unet.channel_mult, config.model.unet.num_res_blocks = 16, (1, 2), 1
config.model.unet.transformer_depth, config.model.unet.head_dim, config.model.unet.norm_groups = (0, 1), 16, 4
config.model.class_embedding_width, config.model.dtype = 32, "float32"
config.batch_size, config.num_train_steps, config.log_every_steps = 16, 3, 1
config.checkpoint_every_steps = config.sample_every_steps = 3
config.eval_num_examples, config.sampling.num_steps, config.sampling.num_per_prompt = 16, 2, 1
config.mesh.shape, config.mesh.replicate_indivisible = (2, 2, 2), True
assert config.dataset.random_flip
with tfds.testing.mock_data(num_examples=64):
  train.train_and_evaluate(config, sys.argv[1])
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
  workdir = str(tmp_path / "cifar10")
  proc = subprocess.run([sys.executable, "-c", script, workdir], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  assert os.path.isfile(os.path.join(workdir, "samples", "step_3.png"))
