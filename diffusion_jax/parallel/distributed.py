"""Multi-process start-up through `jax.distributed`.

On a Cloud TPU VM and under SLURM, `jax.distributed.initialize()` finds the coordinator by itself.
For N local CPU processes set DIFFUSION_JAX_COORDINATOR=host:port, DIFFUSION_JAX_NUM_PROCESSES=N and
DIFFUSION_JAX_PROCESS_ID=i (see launch/local_multiprocess.sh); CPU collectives then go through gloo.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def initialize() -> None:
  """Initializes jax.distributed when the environment describes more than one process."""
  coordinator = os.environ.get("DIFFUSION_JAX_COORDINATOR")
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["DIFFUSION_JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["DIFFUSION_JAX_PROCESS_ID"]))
  elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if jax.process_index() != 0:  # Process 0 writes the log; the others only warn (N copies help nobody).
    logging.set_verbosity(logging.WARNING)
