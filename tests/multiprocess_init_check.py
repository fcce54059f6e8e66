"""Run by tests/test_multiprocess.py as each of 2 processes joined by jax.distributed (gloo), 2 simulated CPU
devices each: the train state initialized on every process's host CPU and laid out over all 4 devices,
against the state initialized on the devices (from the same host draws), and the cross-process equality
check that guards both.
Process 0 prints REPORT <json>."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
from jax.experimental import multihost_utils
import numpy as np

from diffusion_jax import build, memory_fit, train_state
from diffusion_jax.parallel import distributed
from tests.conftest import tiny_config


def create(run, on_host, seconds=None, draw_on_host=None):
  return train_state.create_train_state(jax.random.PRNGKey(0), run.model, run.optimizer, run.mesh, run.rules,
                                        replicate_indivisible=True, on_host=on_host, seconds=seconds,
                                        draw_on_host=draw_on_host)


def global_values(tree):
  """Every leaf's whole value, gathered from all processes: numpy arrays."""
  return [np.asarray(x) for x in jax.tree.leaves(multihost_utils.process_allgather(tree, tiled=True))]


def bit_identical(a, b):
  return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


def main():
  distributed.initialize()
  config = tiny_config()
  config.mesh.shape = (1, -1, 1)  # fsdp over all 4 devices: each process holds half of each split array.
  run = build.build(config)
  host_seconds, device_seconds = {}, {}
  from_host, shardings = create(run, on_host=True, seconds=host_seconds)
  on_devices, _ = create(run, on_host=False, seconds=device_seconds)
  threefry_on_devices = global_values(create(run, on_host=False, draw_on_host=False)[0])
  # The host program's values: the same program on this process's first device alone.
  local_run = build.build(config, mesh_shape=(1, 1, 1), devices=jax.local_devices()[:1])
  on_one_device = [np.asarray(x) for x in jax.tree.leaves(create(local_run, on_host=False)[0])]
  host_values, device_values = global_values(from_host), global_values(on_devices)
  report = {
      "processes": jax.process_count(), "devices": jax.device_count(), "leaves": len(host_values),
      "bit_identical_to_one_device": bit_identical(host_values, on_one_device),
      "max_abs_diff_to_on_devices": max(float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
                                        for a, b in zip(host_values, device_values)),
      "same_shardings": all(a.sharding == s
                            for a, s in zip(jax.tree.leaves(from_host), jax.tree.leaves(shardings))),
      "host_phases": list(host_seconds), "device_phases": list(device_seconds),
      "split_leaves": sum(not a.sharding.is_fully_replicated for a in jax.tree.leaves(from_host.params)),
  }
  # The guard: equal trees pass; one bit flipped in one element on process 1 fails on every process.
  report["equal_trees_pass"] = train_state.equal_on_all_processes(on_one_device)
  flipped = [x.copy() for x in on_one_device]
  if jax.process_index() == 1:
    flipped[-1].reshape(-1).view(np.uint8)[0] ^= 1
  report["one_flipped_bit_fails"] = not train_state.equal_on_all_processes(flipped)
  # Where the guard fails, the state is initialized on the devices with threefry's draws: that path's bits.
  calls = []
  train_state.equal_on_all_processes = lambda tree: calls.append(1) or False
  fallback = global_values(create(run, on_host=True)[0])
  report["fallback_checked_once"] = calls == [1]
  report["fallback_bit_identical_to_threefry_on_devices"] = bit_identical(fallback, threefry_on_devices)
  # Initializing on the devices, the processes compare their draws: where they differ, threefry's.
  calls.clear()
  device_fallback = global_values(create(run, on_host=False)[0])
  report["device_fallback_checked_once"] = calls == [1]
  report["device_fallback_bit_identical_to_threefry"] = bit_identical(device_fallback, threefry_on_devices)
  report["threefry_differs"] = not bit_identical(threefry_on_devices, device_values)
  # The memory limit that each process's train step is checked against: the same on all, the smallest any
  # process's devices report (in whole KiB), so that all compile and choose the same step.
  report["agreed_limit_on_cpus"] = memory_fit.agreed_device_limit(jax.local_devices())
  for name, limits in (("agreed_limit", {0: (80 * 2**30 + 5, "fake:0"), 1: (70 * 2**30 + 1000, "fake:1")}),
                       ("agreed_limit_one_reports", {0: None, 1: (70 * 2**30 + 1000, "fake:1")})):
    memory_fit.device_limit = lambda devices, limits=limits: limits[jax.process_index()]
    report[name] = memory_fit.agreed_device_limit(jax.local_devices())[0]
  all_reports = multihost_utils.process_allgather(np.frombuffer(json.dumps(report, sort_keys=True).encode()
                                                                .ljust(1024), np.uint8))
  report["same_report_on_all_processes"] = len({bytes(r) for r in np.asarray(all_reports)}) == 1
  if jax.process_index() == 0:
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
