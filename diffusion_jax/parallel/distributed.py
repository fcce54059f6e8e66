"""Multi-process start-up through `jax.distributed`.

On a Cloud TPU VM and under SLURM (`srun`), `jax.distributed.initialize()` finds the coordinator by
itself (launch/tpu.py, launch/slurm.py). For N local CPU processes set DIFFUSION_JAX_COORDINATOR=host:port,
DIFFUSION_JAX_NUM_PROCESSES=N and DIFFUSION_JAX_PROCESS_ID=i (launch/local.py does); CPU collectives then
go through gloo.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def _on_cloud_tpu_vm() -> bool:
  """True on a host with TPU chips. VMs made by `tpu-vm create` or queued resources do not export
  TPU_WORKER_HOSTNAMES (GKE does); there jax.distributed finds the workers from the metadata server
  (its GceTpuCluster), and on a single host it forms a job of one process."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top,protected-access
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, AttributeError):  # A JAX without this helper: rely on TPU_WORKER_HOSTNAMES.
    return False


def initialize() -> None:
  """Initializes jax.distributed when the environment describes more than one process."""
  coordinator = os.environ.get("DIFFUSION_JAX_COORDINATOR")
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["DIFFUSION_JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["DIFFUSION_JAX_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # Set by srun only (not in the batch script).
    jax.distributed.initialize()
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or _on_cloud_tpu_vm():
    jax.distributed.initialize()
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if jax.process_index() != 0:  # Process 0 writes the log; the others only warn (N copies help nobody).
    logging.set_verbosity(logging.WARNING)
