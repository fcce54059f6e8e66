"""Cloud TPU VMs driven through `gcloud compute tpus`: create, set up, train, watch, delete, and `run`.

  python -m launch.tpu VERB --name=NAME --zone=ZONE [--accelerator_type=v4-32] [--project=P]
      [--queued_resource] [--spot | --reserved | --preemptible] [--runtime_version=…]
      [--config=configs/digits.py --workdir=gs://BUCKET/runs/digits --config.KEY=VALUE …] [--dry_run]

Verbs:
  create  a TPU VM (`tpu-vm create`), or with --queued_resource a queued resource (`queued-resources
          create`, which returns once the request is queued: `status` shows when it is ACTIVE).
          On demand by default; --spot, --reserved, or --preemptible (TPU VMs of v2, v3, v4 only).
          --runtime_version defaults to the family's image: v2, v3, v4: tpu-ubuntu2204-base,
          v5litepod: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e.
  setup   copies this checkout to every worker and installs it (below).
  train   starts the training command on every worker (`--worker=all`) in the background, each writing
          ~/diffusion_jax_train.log; the workdir must be gs:// when the TPU has several workers.
  logs    follows worker 0's log (`tail -f` over ssh).
  status  describes the TPU (the queued resource with --queued_resource).
  delete  deletes the TPU (the queued resource together with its TPU).
  run     the preemption-safe loop: create the TPU if it is missing (wait while it is being created or
          queued) → setup → train in the foreground. When a step ends (a failure, or even success: a
          preempted trainer saves a checkpoint on the shutdown's SIGTERM and exits 0) with the TPU no longer
          READY (preempted, terminated, suspended, gone), delete and recreate it, set it up and train
          again: the trainer resumes from the last checkpoint in the workdir, which must be gs://. At most
          --max_restarts times. With the TPU still READY it stops: done on status 0, else an error (a
          failure on a healthy TPU would only fail again). Multislice is not supported.

Setup. The working tree as git sees it (tracked files with their uncommitted changes, and untracked files
that are not ignored: never .venv/ or runs/) is packed here into one tarball, copied to every worker with
`tpu-vm scp --worker=all`, and unpacked into ~/diffusion_jax, replacing an earlier copy: the workers run
exactly the code (and configs) of this checkout, committed or not. On every worker uv (installed once, from
astral.sh) makes ~/diffusion_jax_venv with Python 3.11, since the TPU images ship Python 3.10 and JAX needs
3.11 or newer, then installs `jax[tpu]` and the package in one resolution, so jax, jaxlib and libtpu match.
Every step is idempotent: rerun `setup` after changing the code.

Every verb validates its flags before running anything, and `train` and `run` prove a gs:// workdir
writable from this machine (--noprobe_workdir skips that, e.g. without local GCS credentials); --dry_run
prints the exact commands instead.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

from absl import flags

from diffusion_jax import cli
from diffusion_jax.errors import UserError
from launch import common

VERBS = ("create", "setup", "train", "logs", "status", "delete", "run")

_NAME = flags.DEFINE_string("name", None, "TPU name (also the queued resource's name).")
_ZONE = flags.DEFINE_string("zone", None, "Zone, e.g. us-central2-b.")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's configured one).")
_ACCELERATOR_TYPE = flags.DEFINE_string("accelerator_type", None,
                                        "e.g. v4-8, v4-32, v5litepod-16, v5p-128, v6e-256 (create, train, run).")
_RUNTIME_VERSION = flags.DEFINE_string("runtime_version", None, "TPU software image (default: the family's).")
_QUEUED_RESOURCE = flags.DEFINE_bool("queued_resource", False, "Create a queued resource instead of a TPU VM.")
_SPOT = flags.DEFINE_bool("spot", False, "Spot capacity: cheaper, may be preempted at any time.")
_RESERVED = flags.DEFINE_bool("reserved", False, "Use the project's reserved capacity.")
_PREEMPTIBLE = flags.DEFINE_bool("preemptible", False, "Preemptible TPU VM (v2, v3, v4; newer: --spot).")
_MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 5, "run: most times to recreate a preempted TPU.",
                                     lower_bound=0)
_POLL_SECONDS = flags.DEFINE_float("poll_seconds", 60.0, "run: seconds between state checks while the TPU is "
                                   "being created or queued.", lower_bound=0.0)

# Paths on each worker, relative to the ssh login directory (the home directory).
REMOTE_SOURCE = "diffusion_jax"
REMOTE_TARBALL = "diffusion_jax.tar.gz"
REMOTE_VENV = "diffusion_jax_venv"
REMOTE_LOG = "diffusion_jax_train.log"
REMOTE_UV_DIR = ".local/bin"
PYTHON_VERSION = "3.11"


@dataclasses.dataclass(frozen=True)
class Family:
  """A TPU generation. Sizes count TensorCores (v2, v3, v4, v5p: 2 per chip) or chips (v5litepod, v6e)."""
  sizes: tuple[int, ...] | None  # None: any power of two ≥ 8.
  per_worker: int  # Sizes per host in multi-host slices; a slice of at most 8 is one host.
  runtime_version: str
  preemptible: bool  # Supports --preemptible (older generations; newer ones use --spot).


_LITE_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
FAMILIES = {
    "v2": Family((8, 32, 128, 256, 512), 8, "tpu-ubuntu2204-base", True),
    "v3": Family((8, 32, 64, 128, 256, 512, 1024, 2048), 8, "tpu-ubuntu2204-base", True),
    "v4": Family(None, 8, "tpu-ubuntu2204-base", True),
    "v5litepod": Family(_LITE_SIZES, 4, "v2-alpha-tpuv5-lite", False),
    "v5p": Family(None, 8, "v2-alpha-tpuv5", False),
    "v6e": Family(_LITE_SIZES, 4, "v2-alpha-tpuv6e", False),
}
_ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod", "v6": "v6e"}  # What people type → gcloud's name.
_TRANSITIONAL = {"CREATING", "STARTING", "RESTARTING", "REPAIRING", "DELETING", "ACCEPTED", "PROVISIONING",
                 "WAITING_FOR_RESOURCES", "SUSPENDING"}
MISSING = "MISSING"


def _allowed_sizes(family: Family) -> str:
  return "a power of two ≥ 8" if family.sizes is None else "in " + ", ".join(map(str, family.sizes))


def parse_accelerator_type(value: str) -> tuple[Family, int]:
  """(family, size) of e.g. 'v4-32'; UserError naming the value and what is allowed."""
  prefix, _, size_text = value.rpartition("-")
  size = int(size_text) if size_text.isdigit() else 0
  family = FAMILIES.get(prefix)
  if family is None:
    if prefix in _ALIASES:
      raise UserError(f"--accelerator_type={value!r} is not a Cloud TPU type; did you mean "
                      f"'{_ALIASES[prefix]}-{size_text}'?")
    allowed = "; ".join(f"{name}-N with N {_allowed_sizes(f)}" for name, f in FAMILIES.items())
    raise UserError(f"--accelerator_type={value!r} is not a Cloud TPU type; allowed: {allowed}")
  valid = size in family.sizes if family.sizes else size >= 8 and size & (size - 1) == 0
  if not valid:
    raise UserError(f"--accelerator_type={value!r} is not a Cloud TPU type: {prefix}-N needs N "
                    f"{_allowed_sizes(family)}")
  return family, size


def num_workers(accelerator_type: str) -> int:
  """Hosts (TPU VM workers) of a slice: v4-8 → 1, v4-32 → 4, v5litepod-16 → 4, v5p-128 → 16."""
  family, size = parse_accelerator_type(accelerator_type)
  return 1 if size <= 8 else size // family.per_worker


@dataclasses.dataclass(frozen=True)
class Tpu:
  """One TPU (or queued resource) and the gcloud commands that act on it."""
  name: str
  zone: str
  project: str | None = None
  accelerator_type: str | None = None
  runtime_version: str | None = None
  queued: bool = False
  provisioning: str | None = None  # None (on demand), "spot", "reserved" or "preemptible".

  def _gcloud(self, group: str, verb: str, *args: str) -> list[str]:
    project = [f"--project={self.project}"] if self.project else []
    return ["gcloud", "compute", "tpus", group, verb, *args, f"--zone={self.zone}", *project]

  def create(self) -> list[str]:
    family, _ = parse_accelerator_type(self.accelerator_type)
    version = self.runtime_version or family.runtime_version
    extra = [f"--{self.provisioning}"] if self.provisioning else []
    if self.queued:
      return self._gcloud("queued-resources", "create", self.name, f"--node-id={self.name}",
                          f"--accelerator-type={self.accelerator_type}", f"--runtime-version={version}", *extra)
    return self._gcloud("tpu-vm", "create", self.name, f"--accelerator-type={self.accelerator_type}",
                        f"--version={version}", *extra)

  def describe(self, *args: str) -> list[str]:
    return self._gcloud("queued-resources" if self.queued else "tpu-vm", "describe", self.name, *args)

  def describe_node(self, *args: str) -> list[str]:
    return self._gcloud("tpu-vm", "describe", self.name, *args)

  def delete(self) -> list[str]:
    if self.queued:  # --force also deletes the TPU the queued resource made.
      return self._gcloud("queued-resources", "delete", self.name, "--force", "--quiet")
    return self._gcloud("tpu-vm", "delete", self.name, "--quiet")

  def scp(self, local: str, remote: str) -> list[str]:
    return self._gcloud("tpu-vm", "scp", local, f"{self.name}:{remote}", "--worker=all")

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    return self._gcloud("tpu-vm", "ssh", self.name, f"--worker={worker}", f"--command={command}")


def setup_command() -> str:
  """The shell command each worker runs to unpack the tarball and install the package (see the docstring)."""
  src, venv, uv = REMOTE_SOURCE, REMOTE_VENV, f"$HOME/{REMOTE_UV_DIR}/uv"
  return " && ".join([
      f"rm -rf {src}", f"mkdir -p {src}", f"tar -xzf {REMOTE_TARBALL} -C {src}",
      f"{{ [ -x {uv} ] || curl -LsSf https://astral.sh/uv/install.sh"
      f" | env UV_INSTALL_DIR=$HOME/{REMOTE_UV_DIR} UV_NO_MODIFY_PATH=1 sh; }}",
      f"{uv} venv --allow-existing --python {PYTHON_VERSION} {venv}",
      f"{uv} pip install --python {venv}/bin/python \"jax[tpu]\" ./{src}",
  ])


def train_command(config: str, workdir: str, overrides: list[str], background: bool) -> str:
  """The shell command each worker runs to train in ~/diffusion_jax, logging to ~/diffusion_jax_train.log.

  In the background it is detached from the ssh session (setsid nohup), so ssh returns at once; in the
  foreground the output also streams back and the exit status is the trainer's.
  """
  argv = shlex.join(common.train_argv(config, workdir, overrides, python=f"../{REMOTE_VENV}/bin/python"))
  log = f"../{REMOTE_LOG}"
  if background:
    return f"cd {REMOTE_SOURCE} && setsid nohup {argv} > {log} 2>&1 < /dev/null &"
  return f"cd {REMOTE_SOURCE} && set -o pipefail && {argv} 2>&1 | tee {log}"


def _pack(tarball: str) -> None:
  """Packs this checkout's working tree as git sees it (tracked and untracked, not ignored) into `tarball`."""
  try:
    listing = subprocess.run(["git", "-C", common.REPO, "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as exc:
    raise UserError(f"setup packs the files of the git checkout {common.REPO}, and `git ls-files` failed "
                    f"there: {getattr(exc, 'stderr', '') or exc}".strip()) from exc
  with tarfile.open(tarball, "w:gz") as tar:
    for path in sorted(set(listing.split("\0"))):
      if path and os.path.isfile(os.path.join(common.REPO, path)):  # Deleted files are still listed.
        tar.add(os.path.join(common.REPO, path), arcname=path)


def setup(tpu: Tpu, cmds: common.Commands) -> None:
  tarball = os.path.join(tempfile.gettempdir(), f"diffusion_jax-{tpu.name}.tar.gz")
  cmds.note(f"pack {common.REPO} (git ls-files --cached --others --exclude-standard) into {tarball}")
  if not cmds.dry_run:
    _pack(tarball)
  cmds.check(tpu.scp(tarball, REMOTE_TARBALL))
  cmds.check(tpu.ssh(setup_command()))


def _query_state(argv: list[str], name: str) -> str:
  """The state a `describe --format=value(…)` command prints, or MISSING if there is no such TPU."""
  result = subprocess.run(argv, capture_output=True, text=True)
  if result.returncode != 0:
    if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
      return MISSING
    lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
    raise UserError(f"gcloud could not describe TPU {name!r}: {lines[-1]}")
  return result.stdout.strip() or MISSING


def state(tpu: Tpu) -> str:
  """The TPU's state (READY, PREEMPTED, …; a queued resource's own state until it is ACTIVE), or MISSING."""
  if tpu.queued:
    queued = _query_state(tpu.describe("--format=value(state.state)"), tpu.name)
    if queued != "ACTIVE":
      return queued
  return _query_state(tpu.describe_node("--format=value(state)"), tpu.name)


def _wait(tpu: Tpu, current: str) -> str:
  while current in _TRANSITIONAL:
    print(f"TPU {tpu.name} is {current}; checking again in {_POLL_SECONDS.value:g} s", file=sys.stderr, flush=True)
    time.sleep(_POLL_SECONDS.value)
    current = state(tpu)
  return current


def provision(tpu: Tpu, cmds: common.Commands, current: str) -> None:
  """Leaves `tpu` READY: waits while it changes state, creates it if missing, recreates it if it is
  preempted, terminated, stopped, suspended or failed."""
  current = _wait(tpu, current)
  if current == "READY":
    return
  if current != MISSING:
    cmds.check(tpu.delete())
  cmds.check(tpu.create())
  current = _wait(tpu, state(tpu))
  if current != "READY":
    raise UserError(f"TPU {tpu.name!r} is {current} right after it was created; see `python -m launch.tpu status`")


def _attempt(tpu: Tpu, cmds: common.Commands, train: str, current: str) -> str | None:
  """provision → setup → train once; None on success, else what failed."""
  try:
    provision(tpu, cmds, current)
    setup(tpu, cmds)
    status = cmds.call(tpu.ssh(train))
  except UserError as exc:  # E.g. setup's ssh, when the TPU was preempted meanwhile.
    return str(exc)
  if status == 255:
    return "training's ssh exited with status 255 (connection lost; training may still be running: see `logs`)"
  return f"training exited with status {status}" if status else None


def run(tpu: Tpu, cmds: common.Commands, train: str) -> None:
  """create (if missing) → setup → train, recreating a TPU that is no longer READY up to --max_restarts times.

  Whether a failure is a preemption is read from the TPU's state after it, not from the exit status:
  a preempted trainer may even exit 0, having saved a checkpoint on the shutdown's SIGTERM.
  """
  if cmds.dry_run:
    cmds.note("run checks the TPU's state first; printed here as if it did not exist yet")
    cmds.call(tpu.create())
    setup(tpu, cmds)
    cmds.call(tpu.ssh(train))
    return
  current, restarts = state(tpu), 0
  while True:
    failure = _attempt(tpu, cmds, train, current)
    current = state(tpu)
    if current == "READY":
      if failure is None:
        print(f"training finished on TPU {tpu.name}", file=sys.stderr)
        return
      raise UserError(f"{failure}, on TPU {tpu.name!r}, which is READY (not preempted); fix the cause and "
                      f"`run` again to resume from the last checkpoint")
    if restarts == _MAX_RESTARTS.value:
      raise UserError(f"TPU {tpu.name!r} is {current} after {restarts} restarts (--max_restarts={restarts}); "
                      f"`run` again to resume from the last checkpoint (last failure: {failure or 'none'})")
    restarts += 1
    print(f"TPU {tpu.name} is {current}: recreating it and resuming (restart {restarts} of "
          f"{_MAX_RESTARTS.value})", file=sys.stderr, flush=True)


def _provisioning() -> str | None:
  chosen = [f.name for f in (_SPOT, _RESERVED, _PREEMPTIBLE) if f.value]
  if len(chosen) > 1:
    raise UserError(f"choose one of --spot, --reserved, --preemptible (got {', '.join('--' + c for c in chosen)})")
  return chosen[0] if chosen else None


def _tpu(verb: str) -> Tpu:
  """The TPU the flags describe, validated for `verb`."""
  if not _NAME.value or not _ZONE.value:
    raise UserError("--name and --zone are required, e.g. --name=my-tpu --zone=us-central2-b")
  provisioning = _provisioning()
  accelerator_type = _ACCELERATOR_TYPE.value
  if verb in ("create", "train", "run"):
    if not accelerator_type:
      raise UserError(f"{verb} needs --accelerator_type, e.g. --accelerator_type=v4-8")
    family, _ = parse_accelerator_type(accelerator_type)
    if provisioning == "preemptible" and (_QUEUED_RESOURCE.value or not family.preemptible):
      raise UserError("--preemptible is for TPU VMs of v2, v3 and v4 only; use --spot")
  return Tpu(_NAME.value, _ZONE.value, _PROJECT.value, accelerator_type, _RUNTIME_VERSION.value,
             _QUEUED_RESOURCE.value, provisioning)


def _remote_config(path: str) -> str:
  """--config as a path relative to the checkout, which is where the workers run (`:arg` suffix kept)."""
  file_part, colon, arg = path.partition(":")
  relative = os.path.relpath(os.path.realpath(file_part), os.path.realpath(common.REPO))
  if relative.startswith(os.pardir):
    raise UserError(f"--config={path}: the file is outside {common.REPO}, and the workers get only that "
                    f"checkout; put the config under configs/")
  return relative + colon + arg


def _train(tpu: Tpu, verb: str, background: bool) -> str:
  """The validated training command for `verb`."""
  config, workdir = _remote_config(common.config_path()), common.workdir()
  on_gcs = workdir.startswith("gs://")
  workers = num_workers(tpu.accelerator_type)
  if not on_gcs and workers > 1:
    raise UserError(f"--workdir={workdir} is not a gs:// path, and {tpu.accelerator_type} has {workers} "
                    f"workers, each with its own disk: use --workdir=gs://BUCKET/…")
  if not on_gcs and verb == "run":
    raise UserError(f"--workdir={workdir} is not a gs:// path: `run` recreates preempted TPUs, and their disks "
                    f"(with the checkpoints) go with them; use --workdir=gs://BUCKET/…")
  return train_command(config, workdir, common.config_overrides(sys.argv[1:]), background)


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in VERBS:
    raise UserError(f"give one verb, {', '.join(VERBS)} (got {' '.join(argv[1:]) or 'none'})")
  verb = argv[1]
  tpu = _tpu(verb)
  train = _train(tpu, verb, background=verb == "train") if verb in ("train", "run") else None
  common.require_program("gcloud", "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)")
  if train and common.workdir().startswith("gs://"):  # A local workdir is a path on the worker, not here.
    common.check_workdir(common.workdir())
  cmds = common.Commands(common.DRY_RUN.value)
  if verb == "create":
    cmds.check(tpu.create())
    if tpu.queued and not cmds.dry_run:
      print(f"queued resource {tpu.name} requested: `status` shows when it is ACTIVE", file=sys.stderr)
  elif verb == "setup":
    setup(tpu, cmds)
  elif verb == "train":
    cmds.check(tpu.ssh(train))
  elif verb == "logs":
    cmds.check(tpu.ssh(f"tail -n +1 -f {REMOTE_LOG}", worker="0"))
  elif verb == "status":
    cmds.check(tpu.describe())
  elif verb == "delete":
    cmds.check(tpu.delete())
  else:
    run(tpu, cmds, train)


if __name__ == "__main__":
  cli.run(main)
