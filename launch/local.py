"""N local CPU processes that form one jax.distributed job (gloo collectives): multi-process code on one machine.

  python -m launch.local --num_processes=2 --devices_per_process=1 \
      --config=configs/digits.py --workdir=runs/two_procs [--config.KEY=VALUE ...]

Each process gets `--devices_per_process` simulated CPU devices (in XLA_FLAGS, beside any other XLA flags
of the launcher's environment) and finds the others through
DIFFUSION_JAX_COORDINATOR=127.0.0.1:PORT, DIFFUSION_JAX_NUM_PROCESSES and DIFFUSION_JAX_PROCESS_ID, which
diffusion_jax/parallel/distributed.py reads. PORT is a free port unless `--port` is given. The flags'
defaults come from the environment variables of the older launch/local_multiprocess.sh: NUM_PROCESSES (2),
DEVICES_PER_PROCESS (1), PORT, and DRY_RUN (non-empty: print the commands).

The launcher waits for every process and exits with the first non-zero status (0 if all succeed). Ctrl-C in
the terminal reaches every process (they save a checkpoint and stop); a SIGTERM to the launcher is passed on
to each process, which does the same.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys

from absl import flags

from diffusion_jax import cli
from diffusion_jax.errors import UserError
from launch import common

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes to start (default: $NUM_PROCESSES or 2).")
_DEVICES_PER_PROCESS = flags.DEFINE_integer(
    "devices_per_process", None, "Simulated CPU devices per process (default: $DEVICES_PER_PROCESS or 1).")
_PORT = flags.DEFINE_integer("port", None, "Coordinator port on 127.0.0.1 (default: $PORT or a free port).")


def _setting(flag: flags.FlagHolder, env_var: str, default: int | None) -> int | None:
  """The flag's value, else the environment variable's, else `default`; UserError unless a positive integer."""
  value = flag.value
  if value is None:
    text = os.environ.get(env_var, "")
    if not text:
      return default
    if not text.isdigit():
      raise UserError(f"${env_var}={text!r} must be a positive integer (or use --{flag.name})")
    value = int(text)
  if value < 1:
    raise UserError(f"--{flag.name}={value} must be a positive integer")
  return value


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"  # XLA_FLAGS: simulated CPU devices.


def process_env(process_id: int, num_processes: int, devices_per_process: int, port: int,
                xla_flags: str = "") -> dict[str, str]:
  """The environment variables that make a training process `process_id` of a local jax.distributed job.
  `xla_flags` (the launcher's XLA_FLAGS) are passed on, but for their simulated device count."""
  kept = [f for f in xla_flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return {"DIFFUSION_JAX_COORDINATOR": f"127.0.0.1:{port}",
          "DIFFUSION_JAX_NUM_PROCESSES": str(num_processes),
          "DIFFUSION_JAX_PROCESS_ID": str(process_id),
          "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices_per_process}"])}


def _wait_all(procs: list[subprocess.Popen]) -> int:
  """Waits for every process; the first non-zero exit status, else 0."""

  def forward_sigterm(signum, frame):  # pylint: disable=unused-argument
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  # The terminal sends Ctrl-C to every process of the group: the trainers handle it (a second SIGINT
  # would make them quit without saving, so it is not forwarded); the launcher keeps waiting.
  signal.signal(signal.SIGINT, lambda signum, frame: None)
  signal.signal(signal.SIGTERM, forward_sigterm)
  statuses = [p.wait() for p in procs]
  return next((s for s in statuses if s != 0), 0)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  num_processes = _setting(_NUM_PROCESSES, "NUM_PROCESSES", 2)
  devices_per_process = _setting(_DEVICES_PER_PROCESS, "DEVICES_PER_PROCESS", 1)
  dry_run = common.DRY_RUN.value or bool(os.environ.get("DRY_RUN"))
  port = _setting(_PORT, "PORT", None) or _free_port()
  command = common.train_argv(common.config_path(), common.workdir(), common.config_overrides(sys.argv[1:]))
  envs = [process_env(i, num_processes, devices_per_process, port, os.environ.get("XLA_FLAGS", ""))
          for i in range(num_processes)]
  if dry_run:
    for env in envs:
      print(shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *command]))
    return
  procs = [subprocess.Popen(command, env={**os.environ, **env}) for env in envs]
  sys.exit(_wait_all(procs))


if __name__ == "__main__":
  cli.run(main)
