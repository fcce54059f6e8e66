"""The launchers (launch/): the commands they generate, a fake `gcloud` driven end to end, one-line errors.

Every launcher runs as a subprocess, as a user runs it. TPU tests put tests/fake_gcloud.py first on PATH as
`gcloud` (and `sbatch`): it records each call and simulates TPU state, preemption included. gs:// workdirs
map to TMP/gcs/ ($DIFFUSION_JAX_URL_FAKES), so the launchers' write probe runs for real. Nothing trains.
"""

import json
import os
import shlex
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(REPO, "tests", "fake_gcloud.py")
PYTHON = sys.executable

SETUP = ("rm -rf diffusion_jax && mkdir -p diffusion_jax && tar -xzf diffusion_jax.tar.gz -C diffusion_jax"
         " && { [ -x $HOME/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh"
         " | env UV_INSTALL_DIR=$HOME/.local/bin UV_NO_MODIFY_PATH=1 sh; }"
         " && $HOME/.local/bin/uv venv --allow-existing --python 3.11 diffusion_jax_venv"
         " && $HOME/.local/bin/uv pip install --python diffusion_jax_venv/bin/python \"jax[tpu]\" ./diffusion_jax")
TRAIN = "../diffusion_jax_venv/bin/python -m diffusion_jax.main --config=configs/digits.py --workdir=gs://b/run"


class Fake:
  """A bin/ directory with fake `gcloud` and `sbatch`, the record of their calls, and the TPU state file."""

  def __init__(self, tmp_path):
    self.tmp = tmp_path
    self.bin = tmp_path / "bin"
    self.bin.mkdir()
    self.record, self.state = tmp_path / "record.jsonl", tmp_path / "state.json"
    for program in ("gcloud", "sbatch"):
      path = self.bin / program
      path.write_text(f'#!/bin/sh\nexec {shlex.quote(PYTHON)} {shlex.quote(FAKE)} {program} "$@"\n')
      path.chmod(0o755)

  def set_state(self, tpus=None, preempt_trainings=0, fail_trainings=0):
    self.state.write_text(json.dumps({"tpus": tpus or {}, "preempt_trainings": preempt_trainings,
                                      "fail_trainings": fail_trainings}))

  def calls(self):
    if not self.record.exists():
      return []
    return [json.loads(line) for line in self.record.read_text().splitlines()]

  def launch(self, module, *args, path=None, **env):
    """Runs `python -m launch.<module> ARGS` from the repository root with the fakes first on PATH."""
    env = dict(os.environ, PATH=path if path is not None else f"{self.bin}:{os.environ['PATH']}",
               TMPDIR=str(self.tmp), FAKE_GCLOUD_RECORD=str(self.record), FAKE_GCLOUD_STATE=str(self.state),
               DIFFUSION_JAX_URL_FAKES=f"gs={self.tmp / 'gcs'}", **env)
    for var in ("NUM_PROCESSES", "DEVICES_PER_PROCESS", "PORT", "DRY_RUN"):
      env.pop(var, None)
    return subprocess.run([PYTHON, "-m", f"launch.{module}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def fake(tmp_path):
  return Fake(tmp_path)


def _tpu(verb, accelerator_type="v4-8", *args):
  """`VERB --name=t --zone=us-central2-b --accelerator_type=… ARGS` (verb "" for none)."""
  return [*([verb] if verb else []), "--name=t", "--zone=us-central2-b", f"--accelerator_type={accelerator_type}",
          *args]


def _stdout_lines(proc):
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


def _assert_one_line_error(proc, *fragments):
  assert proc.returncode == 2, (proc.stdout, proc.stderr)
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert "Traceback" not in proc.stderr
  for fragment in fragments:
    assert fragment in lines[0]


@pytest.mark.parametrize("accelerator_type, args, expected", [
    ("v4-8", [], "tpu-vm create t --accelerator-type=v4-8 --version=tpu-ubuntu2204-base"),
    ("v3-32", ["--preemptible"], "tpu-vm create t --accelerator-type=v3-32 --version=tpu-ubuntu2204-base --preemptible"),
    ("v5litepod-16", ["--spot"], "tpu-vm create t --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot"),
    ("v5litepod-256", ["--queued_resource", "--spot"],
     "queued-resources create t --node-id=t --accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite --spot"),
    ("v5p-128", ["--queued_resource", "--reserved"],
     "queued-resources create t --node-id=t --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --reserved"),
    ("v6e-64", ["--runtime_version=v2-alpha-tpuv6e-next", "--project=p"],
     "tpu-vm create t --accelerator-type=v6e-64 --version=v2-alpha-tpuv6e-next --zone=us-central2-b --project=p"),
])
def test_create_commands(fake, accelerator_type, args, expected):
  proc = fake.launch("tpu", *_tpu("create", accelerator_type, *args, "--dry_run"))
  zone = "" if "--zone" in expected else " --zone=us-central2-b"
  assert _stdout_lines(proc) == [f"gcloud compute tpus {expected}{zone}"]
  assert fake.calls() == []


@pytest.mark.parametrize("accelerator_type, workers", [
    ("v4-16", 2), ("v5litepod-16", 4), ("v5litepod-256", 64), ("v5p-128", 16)])
def test_multi_host_types_need_a_gs_workdir(fake, accelerator_type, workers):
  proc = fake.launch("tpu", *_tpu("train", accelerator_type, "--config=configs/digits.py",
                                  f"--workdir={fake.tmp / 'run'}"))
  _assert_one_line_error(proc, f"{accelerator_type} has {workers} workers", "gs://")
  assert fake.calls() == [] and not (fake.tmp / "run").exists()


@pytest.mark.parametrize("accelerator_type", ["v4-8", "v5litepod-8", "v6e-4"])
def test_single_host_types_accept_a_local_workdir(fake, accelerator_type):
  proc = fake.launch("tpu", *_tpu("train", accelerator_type, "--config=configs/digits.py", "--workdir=runs/x",
                                  "--dry_run"))
  assert "--workdir=runs/x" in _stdout_lines(proc)[0]


def test_train_logs_status_delete_commands_of_a_queued_pod(fake):
  common = ["--name=t", "--zone=z", "--queued_resource", "--dry_run"]
  train = fake.launch("tpu", "train", *common, "--accelerator_type=v5litepod-256", "--config=configs/digits.py",
                      "--workdir=gs://b/run", "--config.num_train_steps=100", "--config.model.dtype", "bfloat16")
  assert _stdout_lines(train) == [
      "gcloud compute tpus tpu-vm ssh t --worker=all '--command=cd diffusion_jax && setsid nohup "
      f"{TRAIN} --config.num_train_steps=100 --config.model.dtype=bfloat16 > ../diffusion_jax_train.log 2>&1 "
      "< /dev/null &' --zone=z"]
  assert _stdout_lines(fake.launch("tpu", "logs", *common)) == [
      "gcloud compute tpus tpu-vm ssh t --worker=0 '--command=tail -n +1 -f diffusion_jax_train.log' --zone=z"]
  assert _stdout_lines(fake.launch("tpu", "status", *common)) == [
      "gcloud compute tpus queued-resources describe t --zone=z"]
  assert _stdout_lines(fake.launch("tpu", "delete", *common)) == [
      "gcloud compute tpus queued-resources delete t --force --quiet --zone=z"]
  assert fake.calls() == []


def test_dry_run_prints_every_command_of_run_and_runs_nothing(fake):
  proc = fake.launch("tpu", *_tpu("run", "v4-32", "--spot", "--config=configs/digits.py", "--workdir=gs://b/run",
                                  "--dry_run"))
  tarball = fake.tmp / "diffusion_jax-t.tar.gz"
  assert _stdout_lines(proc) == [
      "# run checks the TPU's state first; printed here as if it did not exist yet",
      "gcloud compute tpus tpu-vm create t --accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot "
      "--zone=us-central2-b",
      f"# pack {REPO} (git ls-files --cached --others --exclude-standard) into {tarball}",
      f"gcloud compute tpus tpu-vm scp {tarball} t:diffusion_jax.tar.gz --worker=all --zone=us-central2-b",
      shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t", "--worker=all", f"--command={SETUP}",
                  "--zone=us-central2-b"]),
      "gcloud compute tpus tpu-vm ssh t --worker=all '--command=cd diffusion_jax && set -o pipefail && "
      f"{TRAIN} 2>&1 | tee ../diffusion_jax_train.log' --zone=us-central2-b"]
  assert fake.calls() == [] and not fake.state.exists() and not tarball.exists()


def test_verbs_end_to_end_against_a_fake_gcloud(fake):
  args = _tpu("", "v4-8", "--config=configs/digits.py", "--workdir=gs://b/run")
  for verb in ("create", "setup", "train", "logs", "status", "delete"):
    proc = fake.launch("tpu", verb, *args)
    assert proc.returncode == 0, (verb, proc.stderr)
  where = ["--zone=us-central2-b"]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t"]
  assert fake.calls() == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "t", "--accelerator-type=v4-8",
       "--version=tpu-ubuntu2204-base", *where],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(fake.tmp / "diffusion_jax-t.tar.gz"),
       "t:diffusion_jax.tar.gz", "--worker=all", *where],
      [*ssh, "--worker=all", f"--command={SETUP}", *where],
      [*ssh, "--worker=all", f"--command=cd diffusion_jax && setsid nohup {TRAIN} > ../diffusion_jax_train.log "
       "2>&1 < /dev/null &", *where],
      [*ssh, "--worker=0", "--command=tail -n +1 -f diffusion_jax_train.log", *where],
      ["gcloud", "compute", "tpus", "tpu-vm", "describe", "t", *where],
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t", "--quiet", *where]]
  with tarfile.open(fake.tmp / "diffusion_jax-t.tar.gz") as tar:  # The checkout as git sees it, nothing ignored.
    names = set(tar.getnames())
  assert {"pyproject.toml", "diffusion_jax/main.py", "configs/digits.py", "launch/tpu.py"} <= names
  assert not any(n.startswith((".venv", ".git/")) or "__pycache__" in n for n in names)
  assert json.loads(fake.state.read_text())["tpus"] == {}
  assert (fake.tmp / "gcs" / "b" / "run").is_dir()  # The workdir was proved writable before training.


def _verbs(calls):
  """Each gcloud call as 'group verb' ('tpu-vm ssh'), ssh calls as 'ssh setup' / 'ssh train'."""
  out = []
  for call in calls:
    verb = " ".join(call[3:5])
    if verb == "tpu-vm ssh":
      verb = "ssh train" if any("diffusion_jax.main" in a for a in call) else "ssh setup"
    out.append(verb)
  return out


def test_run_recreates_a_preempted_spot_tpu_and_resumes(fake):
  fake.set_state(preempt_trainings=1)
  proc = fake.launch("tpu", *_tpu("run", "v4-8", "--spot", "--config=configs/digits.py", "--workdir=gs://b/run",
                                  "--poll_seconds=0"))
  assert proc.returncode == 0, proc.stderr
  assert "TPU t is PREEMPTED: recreating it and resuming (restart 1 of 5)" in proc.stderr
  assert _verbs(fake.calls()) == [
      "tpu-vm describe", "tpu-vm create", "tpu-vm describe", "tpu-vm scp", "ssh setup", "ssh train",
      "tpu-vm describe",  # Preempted: delete, recreate, set up, train again (resuming from the checkpoint).
      "tpu-vm delete", "tpu-vm create", "tpu-vm describe", "tpu-vm scp", "ssh setup", "ssh train",
      "tpu-vm describe"]
  creates = [c for c in fake.calls() if c[4] == "create"]
  assert all("--spot" in c for c in creates) and len(creates) == 2
  trains = [c for c in fake.calls() if _verbs([c]) == ["ssh train"]]
  assert trains[0] == trains[1] and "set -o pipefail" in trains[0][-2]  # The same command, in the foreground.
  assert json.loads(fake.state.read_text())["tpus"] == {"t": "READY"}


def test_run_of_a_queued_resource_stops_after_max_restarts(fake):
  fake.set_state(tpus={"t": "READY"}, preempt_trainings=3)
  proc = fake.launch("tpu", *_tpu("run", "v5litepod-16", "--queued_resource", "--spot", "--config=configs/digits.py",
                                  "--workdir=gs://b/run", "--poll_seconds=0", "--max_restarts=1"))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.splitlines()[-1].startswith("error: TPU 't' is SUSPENDED after 1 restarts (--max_restarts=1)")
  verbs = _verbs(fake.calls())
  assert verbs[:3] == ["queued-resources describe", "tpu-vm describe", "tpu-vm scp"]  # READY: no create.
  assert verbs.count("ssh train") == 2 and verbs.count("queued-resources create") == 1
  assert verbs.index("queued-resources delete") < verbs.index("queued-resources create")


def test_run_stops_when_training_fails_on_a_healthy_tpu(fake):
  fake.set_state(tpus={"t": "READY"}, fail_trainings=1)
  proc = fake.launch("tpu", *_tpu("run", "v4-8", "--config=configs/digits.py", "--workdir=gs://b/run"))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.splitlines()[-1] == ("error: training exited with status 1, on TPU 't', which is READY (not "
                                          "preempted); fix the cause and `run` again to resume from the last checkpoint")
  assert _verbs(fake.calls()) == ["tpu-vm describe", "tpu-vm scp", "ssh setup", "ssh train", "tpu-vm describe"]


@pytest.mark.parametrize("accelerator_type, fragments", [
    ("v4-33", ["'v4-33'", "v4-N needs N a power of two ≥ 8"]),
    ("v5e-16", ["'v5e-16'", "did you mean 'v5litepod-16'"]),
    ("v9-8", ["'v9-8'", "v4-N with N a power of two ≥ 8", "v5litepod-N with N in 1, 4, 8, 16, 32, 64, 128, 256"]),
    ("v5litepod-2", ["v5litepod-N needs N in 1, 4, 8"]),
])
def test_mistyped_accelerator_type_is_one_line(fake, accelerator_type, fragments):
  proc = fake.launch("tpu", *_tpu("run", accelerator_type, "--config=configs/digits.py", "--workdir=gs://b/run"))
  _assert_one_line_error(proc, *fragments)
  assert fake.calls() == []


@pytest.mark.parametrize("verb", ["train", "run"])
def test_unwritable_workdir_is_one_line_before_anything_runs(fake, verb):
  (fake.tmp / "gcs").mkdir()
  (fake.tmp / "gcs" / "b").write_text("")  # A file where the bucket's directory would be.
  proc = fake.launch("tpu", *_tpu(verb, "v4-32", "--config=configs/digits.py", "--workdir=gs://b/run"))
  _assert_one_line_error(proc, "--workdir 'gs://b/run'")
  assert fake.calls() == []


def test_missing_gcloud_is_one_line(fake):
  empty = fake.tmp / "empty"
  empty.mkdir()
  proc = fake.launch("tpu", *_tpu("create"), path=str(empty))
  _assert_one_line_error(proc, "gcloud not found on PATH")
  assert fake.calls() == []


@pytest.mark.parametrize("changes, fragments", [
    ({"spot": "", "reserved": ""}, ["choose one of --spot, --reserved, --preemptible"]),
    ({"accelerator_type": "v5p-8", "preemptible": ""}, ["--preemptible is for TPU VMs of v2, v3 and v4 only"]),
    ({"config": "{tmp}/my_config.py"}, ["my_config.py: the file is outside"]),
    ({"config": "configs/nope.py"}, ["config file 'configs/nope.py' does not exist"]),
    ({"workdir": "runs/x"}, ["`run` recreates preempted TPUs"]),
    ({"config.num_train_stepz": "5"}, ["unknown config key 'num_train_stepz'"]),
    ({"name": None}, ["--name and --zone are required"]),
])
def test_bad_run_flags_are_one_line(fake, changes, fragments):
  (fake.tmp / "my_config.py").write_text("from configs.digits import get_config\n")
  flags = {"name": "t", "zone": "z", "accelerator_type": "v4-8", "config": "configs/digits.py",
           "workdir": "gs://b/run", **changes}
  args = [f"--{k}" + (f"={v.format(tmp=fake.tmp)}" if v else "") for k, v in flags.items() if v is not None]
  _assert_one_line_error(fake.launch("tpu", "run", *args), *fragments)
  assert fake.calls() == []


SLURM_2x8 = """\
#!/bin/bash
#SBATCH --job-name=diffusion_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --partition=gpu
#SBATCH --time=24:00:00
#SBATCH --account=proj
#SBATCH --signal=TERM@120
#SBATCH --output={workdir}/slurm-%j.out
# One task per GPU: jax.distributed.initialize() gives each process the GPU numbered SLURM_LOCALID.
set -euo pipefail
cd {repo}
srun --kill-on-bad-exit=1 {python} -m diffusion_jax.main --config={repo}/configs/digits.py --workdir={workdir} \
--config.batch_size=512
"""


def _slurm(fake, workdir, *args, **kwargs):
  return fake.launch("slurm", "--nodes=2", "--gpus_per_node=8", "--partition=gpu", "--time=24:00:00",
                     "--account=proj", "--config=configs/digits.py", f"--workdir={workdir}",
                     "--config.batch_size=512", *args, **kwargs)


def test_slurm_dry_run_prints_the_script_and_sbatch(fake):
  workdir = fake.tmp / "run"
  proc = _slurm(fake, workdir, "--dry_run")
  script = SLURM_2x8.format(workdir=workdir, repo=REPO, python=PYTHON)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == f"# {workdir}/train.sbatch:\n{script}sbatch {workdir}/train.sbatch\n"
  assert fake.calls() == [] and not workdir.exists()


def test_slurm_writes_the_script_and_submits_it(fake):
  workdir = fake.tmp / "run"
  proc = _slurm(fake, workdir, "--cpus_per_task=12")
  assert proc.returncode == 0, proc.stderr
  assert fake.calls() == [["sbatch", f"{workdir}/train.sbatch"]]
  script = (workdir / "train.sbatch").read_text()
  assert "#SBATCH --cpus-per-task=12\n" in script and "srun --kill-on-bad-exit=1 --cpus-per-task=12 " in script


def test_slurm_errors_are_one_line_and_submit_nothing(fake):
  in_the_way = fake.tmp / "a_file"
  in_the_way.write_text("")
  _assert_one_line_error(_slurm(fake, in_the_way / "run"), "--workdir", "not writable")
  empty = fake.tmp / "empty"
  empty.mkdir()
  _assert_one_line_error(_slurm(fake, fake.tmp / "run", path=str(empty)), "sbatch not found on PATH")
  assert fake.calls() == []


def test_local_dry_run_prints_one_command_per_process(fake):
  # The launcher's own XLA flags reach each process, but for its device count, which --devices_per_process sets.
  proc = fake.launch("local", "--num_processes=3", "--devices_per_process=2", "--port=12345", "--dry_run",
                     "--config=configs/smoke.py", "--workdir=runs/mp", "--config.num_train_steps=6",
                     XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/hlo")
  assert _stdout_lines(proc) == [
      f"env DIFFUSION_JAX_COORDINATOR=127.0.0.1:12345 DIFFUSION_JAX_NUM_PROCESSES=3 DIFFUSION_JAX_PROCESS_ID={i} "
      f"JAX_PLATFORMS=cpu 'XLA_FLAGS=--xla_dump_to=/tmp/hlo --xla_force_host_platform_device_count=2' {PYTHON} "
      "-m diffusion_jax.main --config=configs/smoke.py --workdir=runs/mp --config.num_train_steps=6"
      for i in range(3)]


def test_local_multiprocess_sh_keeps_its_environment_variables(fake):
  env = dict(os.environ, NUM_PROCESSES="2", DEVICES_PER_PROCESS="4", DRY_RUN="1", PYTHON=PYTHON)
  env.pop("PORT", None)
  script = os.path.join(REPO, "launch", "local_multiprocess.sh")
  proc = subprocess.run(["bash", script, f"--config={REPO}/configs/smoke.py", "--workdir=runs/mp"],
                        cwd=fake.tmp, env=env, capture_output=True, text=True, timeout=120)  # Not from the repo.
  lines = _stdout_lines(proc)
  assert len(lines) == 2 and all("--xla_force_host_platform_device_count=4" in line for line in lines)
  ports = {line.split()[1] for line in lines}
  assert len(ports) == 1 and "DIFFUSION_JAX_PROCESS_ID=1" in lines[1]
  _assert_one_line_error(subprocess.run(["bash", script],
                                        cwd=fake.tmp, env=dict(env, NUM_PROCESSES="two"), capture_output=True,
                                        text=True, timeout=120), "$NUM_PROCESSES='two'")
