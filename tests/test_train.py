"""A real train step on the digits pipeline: loss goes down, checkpoints restore exactly, resume is exact."""

import functools
import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import build, train, train_state
from diffusion_jax import train_step as train_step_lib
from diffusion_jax.checkpoint import Checkpointer
from diffusion_jax.data import pipeline
from diffusion_jax.diffusion import losses
from diffusion_jax.images import to_model_range
from diffusion_jax.parallel import mesh as mesh_lib
from tests.conftest import perturbed, randomized


def _setup(config):
  run = build.build(config)
  state, shardings = train_state.create_train_state(jax.random.PRNGKey(0), run.model, run.optimizer, run.mesh,
                                                    run.rules)
  return run, state, shardings


def _step_fn(run, config):
  """The train step, jitted without donation (the tests step the same state more than once)."""
  null_inputs = jax.tree.map(jnp.asarray, run.conditioning.null_inputs(1))
  return jax.jit(functools.partial(train_step_lib.train_step, model=run.model, tx=run.optimizer,
                                   schedule=run.schedule, config=config, autoencoder=run.autoencoder,
                                   null_inputs=null_inputs))


def test_learning_rate_schedules_match_their_closed_forms(config):
  """Linear warm-up from 0 to the peak over warmup_steps, then (cosine) a half cosine down to 0 at
  num_train_steps, which counts the warm-up, and 0 after it; or (constant) the peak."""
  config.optimizer.learning_rate, config.optimizer.warmup_steps, config.num_train_steps = 1e-3, 10, 110
  steps = np.array([0, 1, 5, 10, 35, 60, 109, 110, 200])
  warmup = 1e-3 * steps / 10
  expected = {"cosine": np.where(steps < 10, warmup, 0.5e-3 * (1 + np.cos(np.pi * np.minimum(steps - 10, 100) / 100))),
              "constant": np.where(steps < 10, warmup, 1e-3)}
  for name, values in expected.items():
    config.optimizer.schedule = name
    schedule = train_state.learning_rate_schedule(config)
    np.testing.assert_allclose([float(schedule(s)) for s in steps], values, rtol=1e-5, atol=1e-10, err_msg=name)


def test_the_host_path_is_chosen_only_for_a_state_within_half_the_available_memory(monkeypatch, tmp_path):
  """Every process holds a whole copy of the state on the host path: over half the host's available
  memory (Linux's MemAvailable, which counts the page cache it can drop) it initializes on the devices."""
  meminfo = tmp_path / "meminfo"
  meminfo.write_text("MemTotal:       16000 kB\nMemFree:          100 kB\nMemAvailable:     4000 kB\n")
  assert train_state._available_host_memory(str(meminfo)) == 4_096_000  # pylint: disable=protected-access
  assert train_state._available_host_memory(str(tmp_path / "absent")) > 0  # The free pages, from sysconf.
  monkeypatch.setattr(train_state, "_available_host_memory", lambda: 4_096_000)
  state = lambda n: {"params": jax.ShapeDtypeStruct((n, 1000), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
  assert train_state._fits_in_host_memory(state(511), "state")  # 2,044,004 bytes  pylint: disable=protected-access
  assert not train_state._fits_in_host_memory(state(512), "state")  # 2,048,004 bytes  pylint: disable=protected-access


def test_the_smoke_step_does_not_depend_on_the_run_length(config):
  """configs/smoke.py's step is one program for every num_train_steps (which the tests vary), so the
  persistent compilation cache shares it between runs of different lengths."""
  texts = []
  for num_train_steps in (20, 40):
    config.num_train_steps = num_train_steps
    run = build.build(config)
    state = run.abstract_state()
    step = train_step_lib.make_train_step(run, jax.tree.map(lambda leaf: leaf.sharding, state))
    texts.append(step.lower(state, train_step_lib.abstract_global_batch(run)).as_text())
  assert texts[0] == texts[1]


def test_on_a_cpu_the_step_copies_none_of_its_state(config):
  """XLA:CPU writes a donated state in place only after copying the parameters and both Adam moments
  (`compiler.donates_state`: 683 such copies in this step when donated), so on a CPU the step takes fresh
  output buffers instead, and its compiled program copies none of them."""
  if jax.default_backend() != "cpu":
    pytest.skip("accelerators donate the state")
  run = build.build(config)
  state = run.abstract_state()
  step = train_step_lib.make_train_step(run, jax.tree.map(lambda leaf: leaf.sharding, state))
  with mesh_lib.activate(run.mesh, run.rules):  # As train.py traces it: the compile is shared through the cache.
    compiled = step.lower(state, train_step_lib.abstract_global_batch(run)).compile()
  assert compiled.memory_analysis().alias_size_in_bytes == 0  # Nothing donated.
  entry = compiled.as_text().split("\nENTRY ", 1)[1]
  inputs = set(re.findall(r"(%\S+) = \S+ parameter\(\d+\)", entry))
  assert len(inputs) >= 4 * len(jax.tree.leaves(state.params))  # Parameters, EMA, two moments (+ counters).
  copied = sorted(src for src in re.findall(r" copy\((%[^),]+)\)", entry) if src in inputs)
  # Only the RNG key may be copied: the step returns it unchanged, and an output never shares an input's buffer.
  assert all(name.startswith("%state_rng") for name in copied), f"{len(copied)} input arrays copied: {copied[:4]}"


def test_loss_decreases_on_a_fixed_batch(config):
  config.optimizer.learning_rate = 3e-3
  config.diffusion.p_uncond = 0.0
  run, state, _ = _setup(config)
  model, schedule = run.model, run.schedule
  batch = next(pipeline.create_train_iterator(config, tokenizer=run.conditioning.tokenizer))
  batch = {k: jnp.asarray(batch[k]) for k in ("image", "tokens")}
  step = _step_fn(run, config)

  @jax.jit
  def fixed_loss(params):  # The same 16 (t, ε) draws per example every time: a deterministic objective.
    predict = lambda x_t, t: model.apply({"params": params}, x_t, t, {"tokens": batch["tokens"]})
    x0 = to_model_range(batch["image"])
    keys = jax.random.split(jax.random.PRNGKey(123), 16)
    return jnp.mean(jax.vmap(lambda k: losses.diffusion_loss(predict, x0, schedule, "eps", k))(keys))

  before = float(fixed_loss(state.params))
  for _ in range(40):
    state, metrics = step(state, batch)
  after = float(fixed_loss(state.params))
  assert np.isfinite(float(metrics["loss"]))
  assert after < 0.5 * before, (before, after)


def test_checkpoint_restores_identical_state_and_data_position(config, tmp_path):
  run, state, shardings = _setup(config)
  # Make the state non-trivial: random params, a non-zero step.
  state = state.replace(step=jnp.int32(7), params=perturbed(state.params, 0.01))
  it = pipeline.create_train_iterator(config, tokenizer=run.conditioning.tokenizer)
  next(it), next(it)
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
  ckpt.save(7, state, it, config.to_dict())
  ckpt.wait()
  expected_next = next(it)

  fresh_it = pipeline.create_train_iterator(config, tokenizer=run.conditioning.tokenizer)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
  restored = Checkpointer(str(tmp_path)).restore(7, abstract, fresh_it)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(next(fresh_it)["tokens"], expected_next["tokens"])


class _CompileCounter(logging.Handler):
  """Counts XLA compilations of the train step (jax logs each one when jax_log_compiles is on)."""

  def __init__(self):
    super().__init__()
    self.count = 0

  def emit(self, record):
    message = record.getMessage()
    self.count += "Finished XLA compilation" in message and "train_step" in message

  def __enter__(self):
    jax.config.update("jax_log_compiles", True)  # Global, not a context: the step compiles on another thread.
    logging.getLogger("jax").addHandler(self)
    return self

  def __exit__(self, *exc):
    logging.getLogger("jax").removeHandler(self)
    jax.config.update("jax_log_compiles", False)


def test_train_writes_outputs_and_resumes_exactly(config, tmp_path):
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  config.num_train_steps = 20
  with _CompileCounter() as compiles:
    final = train.train_and_evaluate(config, straight)
  assert int(final.step) == 20
  # The step compiled on a background thread during start-up is the program the loop runs: one compile.
  assert compiles.count == 1
  # Contract files: config.json, metrics.jsonl, samples/step_N.png, checkpoints/<step>/, TB events.
  records = [json.loads(l) for l in open(os.path.join(straight, "metrics.jsonl"))]
  losses_logged = [r for r in records if "loss" in r]
  assert [r["step"] for r in losses_logged] == [10, 20]
  assert all(np.isfinite(r["loss"]) for r in losses_logged)
  assert os.path.exists(os.path.join(straight, "samples", "step_20.png"))
  assert sorted(os.listdir(os.path.join(straight, "checkpoints")))[:2] == ["10", "20"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(straight))

  # A copy of the run that lost everything after step 10's checkpoint resumes to a bit-identical end.
  shutil.copytree(straight, split)
  shutil.rmtree(os.path.join(split, "checkpoints", "20"))
  with _CompileCounter() as compiles:
    resumed = train.train_and_evaluate(config, split)
  assert int(resumed.step) == 20
  assert compiles.count == 1  # Also for a restored state.
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_caption_dropout_replaces_captions_by_the_empty_prompt(config):
  """p_uncond = 1: the step cannot see the captions; p_uncond = 0: it does."""
  run, state, _ = _setup(config)
  state = state.replace(params=randomized(state.params))  # Zero-initialized outputs would hide the text.
  batch = next(pipeline.create_train_iterator(config, tokenizer=run.conditioning.tokenizer))
  images = jnp.asarray(batch["image"])
  tokens_a = jnp.asarray(batch["tokens"])
  tokens_b = jnp.roll(tokens_a, 1, axis=0)
  results = {}
  for p_uncond in (0.0, 1.0):
    config.diffusion.p_uncond = p_uncond
    step = _step_fn(run, config)
    results[p_uncond] = [float(step(state, {"image": images, "tokens": t})[1]["loss"]) for t in (tokens_a, tokens_b)]
  assert results[1.0][0] == results[1.0][1]
  assert results[0.0][0] != results[0.0][1]
