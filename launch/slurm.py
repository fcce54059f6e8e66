"""SLURM: an sbatch script for multi-node GPU training, written and submitted (`--dry_run`: printed).

  python -m launch.slurm --nodes=2 --gpus_per_node=8 --partition=gpu --time=24:00:00 [--account=A] \
      --config=configs/digits.py --workdir=/shared/runs/digits [--config.KEY=VALUE ...]

Task layout: one task (process) per GPU, every task seeing all GPUs of its node. `srun` starts
`python -m diffusion_jax.main` in each task; diffusion_jax/parallel/distributed.py calls
`jax.distributed.initialize()` with no arguments when SLURM_NTASKS > 1, and JAX's SLURM detection takes the
coordinator from the first node of SLURM_STEP_NODELIST, the process index from SLURM_PROCID, and gives each
process the one GPU numbered SLURM_LOCALID. That is why one task per GPU: with one task per node every
process would drive only its node's GPU 0. It is also why the script binds no GPU to a task
(--gpus-per-task or --gpu-bind would renumber the GPUs each task sees, so GPU SLURM_LOCALID would not exist).

The script runs from this checkout (the interpreter and the checkout must be on a filesystem the nodes share)
with the config as an absolute path. `--signal=TERM@120` asks SLURM for a SIGTERM two minutes before the
time limit: the trainer then saves a checkpoint at a step all processes agree on and exits, and submitting
the same script again resumes from it. A local workdir also gets the script (train.sbatch) and SLURM's
output (slurm-<job id>.out).
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import flags

from diffusion_jax import cli, paths
from diffusion_jax.errors import UserError
from launch import common

_NODES = flags.DEFINE_integer("nodes", 1, "Nodes.", lower_bound=1)
_GPUS_PER_NODE = flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node (one task each).", lower_bound=1)
_PARTITION = flags.DEFINE_string("partition", None, "SLURM partition.")
_TIME = flags.DEFINE_string("time", None, "Time limit, e.g. 24:00:00 (default: the partition's).")
_ACCOUNT = flags.DEFINE_string("account", None, "Account to charge (default: yours).")
_CPUS_PER_TASK = flags.DEFINE_integer("cpus_per_task", None, "CPU cores per task, for the input pipeline "
                                      "(default: the cluster's, often 1).", lower_bound=1)
_JOB_NAME = flags.DEFINE_string("job_name", "diffusion_jax", "Job name.")
_SCRIPT = flags.DEFINE_string("script", None, "Where to write the script (default: WORKDIR/train.sbatch, or "
                              "./train.sbatch for a gs:// workdir).")
_PYTHON = flags.DEFINE_string("python", sys.executable, "The interpreter on the nodes (default: this one).")

PREEMPTION_NOTICE_S = 120  # The trainer needs one step plus a checkpoint save.


def sbatch_script(*, nodes: int, gpus_per_node: int, partition: str | None, time: str | None,
                  account: str | None, cpus_per_task: int | None, job_name: str, output: str | None,
                  train: list[str]) -> str:
  """The sbatch script: #SBATCH lines, then `srun` of the training command `train` in every task."""
  options = {"job-name": job_name, "nodes": nodes, "ntasks-per-node": gpus_per_node,
             "gpus-per-node": gpus_per_node, "partition": partition, "time": time, "account": account,
             "cpus-per-task": cpus_per_task, "signal": f"TERM@{PREEMPTION_NOTICE_S}", "output": output}
  srun = ["srun", "--kill-on-bad-exit=1"]
  if cpus_per_task:  # srun does not inherit sbatch's --cpus-per-task (SLURM ≥ 22.05).
    srun.append(f"--cpus-per-task={cpus_per_task}")
  return "\n".join([
      "#!/bin/bash",
      *(f"#SBATCH --{key}={value}" for key, value in options.items() if value is not None),
      "# One task per GPU: jax.distributed.initialize() gives each process the GPU numbered SLURM_LOCALID.",
      "set -euo pipefail",
      f"cd {shlex.quote(common.REPO)}",
      shlex.join(srun + train),
  ]) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  config, workdir = common.config_path(), common.workdir()
  file_part, colon, arg = config.partition(":")
  config = os.path.abspath(file_part) + colon + arg  # The job runs from the checkout, not from here.
  local = not paths.is_url(workdir)
  if local:
    workdir = os.path.abspath(workdir)
  script_path = _SCRIPT.value or (os.path.join(workdir, "train.sbatch") if local else "train.sbatch")
  common.require_program("sbatch", "run this on a SLURM login node")
  common.check_workdir(workdir)
  script = sbatch_script(
      nodes=_NODES.value, gpus_per_node=_GPUS_PER_NODE.value, partition=_PARTITION.value, time=_TIME.value,
      account=_ACCOUNT.value, cpus_per_task=_CPUS_PER_TASK.value, job_name=_JOB_NAME.value,
      output=os.path.join(workdir, "slurm-%j.out") if local else None,
      train=common.train_argv(config, workdir, common.config_overrides(sys.argv[1:]), python=_PYTHON.value))
  cmds = common.Commands(common.DRY_RUN.value)
  if cmds.dry_run:
    cmds.note(f"{script_path}:")
    print(script, end="")
  else:
    try:
      os.makedirs(os.path.dirname(os.path.abspath(script_path)), exist_ok=True)
      with open(script_path, "w") as f:
        f.write(script)
    except OSError as exc:
      raise UserError(f"cannot write the script {script_path!r}: {paths.describe_os_error(exc)}") from exc
    print(f"wrote {script_path}", file=sys.stderr)
  cmds.check(["sbatch", script_path])


if __name__ == "__main__":
  cli.run(main)
