"""A stand-in for `gcloud compute tpus …` (and `sbatch`) in the launcher tests.

Usage: fake_gcloud.py PROGRAM ARGS… (tests put small `gcloud` / `sbatch` wrappers first on PATH).
Every call appends [PROGRAM, *ARGS] as one JSON line to $FAKE_GCLOUD_RECORD. TPUs live in the JSON file
$FAKE_GCLOUD_STATE: {"tpus": {name: state}, "preempt_trainings": n}. create makes a TPU READY; while n > 0
a training ssh (its command runs diffusion_jax.main) leaves the TPU PREEMPTED and fails like a dropped
ssh connection (status 255), and n goes down by one. A queued resource is ACTIVE while its TPU is READY
and SUSPENDED once it is preempted.
"""

import json
import os
import sys


def _load() -> dict:
  path = os.environ["FAKE_GCLOUD_STATE"]
  if not os.path.exists(path):
    return {"tpus": {}}
  with open(path) as f:
    return json.load(f)


def _save(state: dict) -> None:
  with open(os.environ["FAKE_GCLOUD_STATE"], "w") as f:
    json.dump(state, f)


def _not_found(name: str) -> int:
  print(f"ERROR: (gcloud.compute.tpus) NOT_FOUND: Resource 'nodes/{name}' was not found", file=sys.stderr)
  return 1


def _runs_training(args: list[str]) -> bool:
  return any(a.startswith("--command=") and "diffusion_jax.main" in a for a in args)


def gcloud(args: list[str]) -> int:
  assert args[:2] == ["compute", "tpus"], args
  group, verb = args[2], args[3]
  positional = [a for a in args[4:] if not a.startswith("--")]
  name = positional[1].split(":")[0] if verb == "scp" else positional[0]
  state = _load()
  tpus = state["tpus"]
  if verb == "create":
    if name in tpus:
      print(f"ERROR: ALREADY_EXISTS: {name}", file=sys.stderr)
      return 1
    tpus[name] = "READY"
  elif name not in tpus:
    return _not_found(name) if verb in ("describe", "delete") else 255
  elif verb == "delete":
    del tpus[name]
  elif verb == "describe":
    tpu_state = tpus[name]
    if group == "queued-resources":
      tpu_state = "ACTIVE" if tpu_state == "READY" else "SUSPENDED"
    print(tpu_state if any(a.startswith("--format=value(") for a in args) else f"state: {tpu_state}")
  elif tpus[name] != "READY":  # scp, ssh
    print(f"ssh: connect to host {name}: Connection refused", file=sys.stderr)
    return 255
  elif verb == "ssh" and _runs_training(args) and state.get("preempt_trainings", 0) > 0:
    state["preempt_trainings"] -= 1
    tpus[name] = "PREEMPTED"
    _save(state)
    print("Connection to worker closed by remote host.", file=sys.stderr)
    return 255
  elif verb == "ssh" and _runs_training(args) and state.get("fail_trainings", 0) > 0:
    state["fail_trainings"] -= 1
    _save(state)
    print("Traceback (most recent call last): … ZeroDivisionError", file=sys.stderr)
    return 1
  _save(state)
  return 0


def main() -> int:
  program, args = sys.argv[1], sys.argv[2:]
  with open(os.environ["FAKE_GCLOUD_RECORD"], "a") as f:
    f.write(json.dumps([program, *args]) + "\n")
  if program == "sbatch":
    print("Submitted batch job 1")
    return 0
  return gcloud(args)


if __name__ == "__main__":
  sys.exit(main())
