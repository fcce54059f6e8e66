"""Run by tests/test_parallel.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set
before jax is imported). Trains a few steps on the same batches on several meshes and prints, as JSON,
how far each is from the 1-device run, and the per-device share of parameter and optimizer bytes."""

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from diffusion_jax import build, train_state
from diffusion_jax import train_step as train_step_lib
from diffusion_jax.checkpoint import Checkpointer, fingerprint
from diffusion_jax.data import pipeline
from diffusion_jax.errors import UserError
from diffusion_jax.parallel import mesh as mesh_lib
from tests.conftest import perturbed, tiny_config

STEPS = 3


def train_on_mesh(config, devices):
  """STEPS train steps on a mesh of `devices` shaped config.mesh.shape: (state, losses)."""
  run = build.build(config, devices=devices)
  state, shardings = train_state.create_train_state(jax.random.PRNGKey(0), run.model, run.optimizer, run.mesh,
                                                    run.rules, config.mesh.replicate_indivisible)
  # Zero-initialized output layers make every other gradient exactly 0 at step 0 and tiny after it;
  # Adam normalizes such float-noise-level gradients to full-size steps, so start from perturbed
  # parameters, where gradients are well above rounding noise (the same on every mesh).
  state = state.replace(params=perturbed(state.params))
  step = train_step_lib.make_train_step(run, shardings)
  it = pipeline.create_train_iterator(config, tokenizer=run.conditioning.tokenizer)
  keys = ("image",) + tuple(run.conditioning.input_keys)
  losses = []
  with mesh_lib.activate(run.mesh, run.rules):
    for _ in range(STEPS):
      state, metrics = step(state, train_step_lib.global_batch(next(it), run.mesh, keys))
      losses.append(float(metrics["loss"]))
  return state, losses


def restore_on_other_meshes(config, state):
  """Saves `state` (sharded over 8 devices) and restores it onto 1 device and onto fsdp = 4."""
  tokenizer = build.build(config).conditioning.tokenizer
  saved = jax.tree.leaves(jax.device_get(state))
  results = {}
  with tempfile.TemporaryDirectory() as workdir:
    checkpointer = Checkpointer(workdir)
    checkpointer.save(3, state, pipeline.create_train_iterator(config, tokenizer=tokenizer), config.to_dict())
    checkpointer.wait()
    for name, shape, devices in (("1_device", (1, 1, 1), jax.devices()[:1]), ("fsdp_4", (1, 4, 1), jax.devices()[:4])):
      abstract = build.build(config, mesh_shape=shape, devices=devices).abstract_state(replicate_indivisible=True)
      restored = checkpointer.restore(3, abstract, pipeline.create_train_iterator(config, tokenizer=tokenizer))
      leaves = jax.tree.leaves(restored)
      results[name] = {
          "bit_identical": len(leaves) == len(saved) and all(
              np.array_equal(np.asarray(a), b) for a, b in zip(jax.device_get(leaves), saved)),
          "devices": sorted({d.id for l in leaves for d in l.sharding.device_set}),
          "params_fraction_on_device0": device0_fraction(restored.params),
          "fingerprint_equal": fingerprint(restored) == fingerprint(state),
      }
    checkpointer.close()
  return results


def compare_host_init(config, shape):
  """The state from parameters initialized on the host CPU and copied to their shards on `shape` (what
  one process on an accelerator does) against the state initialized on those shards, and on one device."""
  phases = {}  # Per path: (the phases create_train_state timed, their sum, the call's wall seconds).

  def create(shape, devices, on_host):
    config.mesh.shape = shape
    run = build.build(config, devices=devices)
    seconds, start = {}, time.perf_counter()
    created = train_state.create_train_state(jax.random.PRNGKey(0), run.model, run.optimizer, run.mesh,
                                             run.rules, config.mesh.replicate_indivisible, on_host=on_host,
                                             seconds=seconds)
    phases["host" if on_host else "devices"] = (list(seconds), sum(seconds.values()), time.perf_counter() - start)
    return created
  from_host, shardings = create(shape, jax.devices(), True)
  on_shards, _ = create(shape, jax.devices(), False)
  on_one_device, _ = create((1, 1, 1), jax.devices()[:1], False)
  host = [np.asarray(x) for x in jax.tree.leaves(from_host)]
  return {"leaves": len(host), "phases": phases,
          "bit_identical_to_one_device": all(np.array_equal(a, np.asarray(b))
                                             for a, b in zip(host, jax.tree.leaves(on_one_device))),
          "max_abs_diff_to_on_shards": max(float(np.abs(a.astype(np.float64) - np.asarray(b, np.float64)).max())
                                           for a, b in zip(host, jax.tree.leaves(on_shards))),
          "same_shardings": all(a.sharding == s for a, s in zip(jax.tree.leaves(from_host),
                                                                 jax.tree.leaves(shardings))),
          "params_fraction_on_device0": device0_fraction(from_host.params),
          # The train step donates its state on accelerators: no two leaves (params and their EMA copy
          # above all, made from one placed array) may share a device buffer.
          "own_buffers": own_buffers(from_host)}


def own_buffers(tree) -> bool:
  shards = [s for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards]
  return len({s.data.unsafe_buffer_pointer() for s in shards}) == len(shards)


def device0_fraction(tree):
  """Bytes of `tree` stored on device 0 / total logical bytes."""
  leaves = jax.tree.leaves(tree)
  total = sum(l.nbytes for l in leaves)
  on_device0 = sum(s.data.nbytes for l in leaves for s in l.addressable_shards if s.device == jax.devices()[0])
  return on_device0 / total


def main():
  config = tiny_config(sys.argv[1])
  config.batch_size = 16
  config.mesh.replicate_indivisible = True  # conv_in has 1 input channel: it cannot be split 8 ways.
  config.mesh.shape = (1, 1, 1)
  base_state, base_losses = train_on_mesh(config, jax.devices()[:1])
  base = jax.tree.leaves(jax.device_get(base_state.params))
  report = {"num_devices": jax.device_count(), "baseline_losses": base_losses, "meshes": {}}
  for shape in ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)):
    config.mesh.shape = shape
    state, losses = train_on_mesh(config, jax.devices())
    if shape == (1, 8, 1):
      report["restore_fsdp8_onto"] = restore_on_other_meshes(config, state)
    params = jax.tree.leaves(jax.device_get(state.params))
    report["meshes"][str(shape)] = {
        "losses": losses,
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses, base_losses)),
        "max_abs_param_diff": max(float(np.abs(a - b).max()) for a, b in zip(params, base)),
        "params_fraction_on_device0": device0_fraction(state.params),
        "opt_state_fraction_on_device0": device0_fraction(state.opt_state),
    }
  # Gradient accumulation on a sharded mesh against the same 1-device baseline.
  config.mesh.shape, config.gradient_accumulation_steps = (1, 4, 2), 2
  state, losses = train_on_mesh(config, jax.devices())
  report["accumulate_2_on_(1,4,2)"] = {
      "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses, base_losses)),
      "max_abs_param_diff": max(float(np.abs(a - b).max())
                                for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), base))}
  config.gradient_accumulation_steps = 1
  report["host_init_(1,8,1)"] = compare_host_init(config, (1, 8, 1))
  # Clear errors: an indivisible parameter dimension (strict mode) and an indivisible batch.
  config.mesh.shape, config.mesh.replicate_indivisible = (1, 8, 1), False
  report["errors"] = {}
  try:
    train_on_mesh(config, jax.devices())
  except UserError as exc:
    report["errors"]["indivisible_parameter"] = str(exc)
  config.batch_size = 12
  try:
    train_step_lib.check_batch_divisibility(config, mesh_lib.create_mesh((8, 1, 1)))
  except UserError as exc:
    report["errors"]["indivisible_batch"] = str(exc)
  print("REPORT " + json.dumps(report))


if __name__ == "__main__":
  main()
