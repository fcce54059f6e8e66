"""The run files of a workdir or export: config.json and the evaluation records eval/<step>.json.

`workdir/config.json` is the resolved config of a run (a contract: other tools read it), written
atomically, read merged onto today's defaults (so a run written before a key existed still loads), and
compared with the config of a resumed run. `eval/<step>.json` is one flat JSON object per evaluated
step: the settings that determine its numbers, then the metrics; evaluations with the same settings
merge into it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from absl import logging

from diffusion_jax import config as config_lib
from diffusion_jax.errors import UserError

CONFIG_FILE = "config.json"


def write_config(config, directory: str) -> None:
  """Writes directory/config.json atomically: a reader sees the old file or the new one, never half."""
  path = os.path.join(directory, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config_lib.to_json(config))
  os.replace(tmp, path)


def read_config(path: str):
  """The config of a training workdir or an exported directory, merged onto today's defaults."""
  if not os.path.exists(path):
    raise UserError(f"{path!r} does not exist; pass the --workdir of a training run or an exported directory")
  if not os.path.isdir(path):
    raise UserError(f"{path!r} is not a directory; pass the --workdir of a training run or an exported directory")
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise UserError(f"{config_path!r} does not exist; is {path!r} a training workdir or an exported directory?")
  try:
    with open(config_path, encoding="utf-8") as f:
      return config_lib.with_defaults(config_lib.from_json(f.read()))
  except (OSError, ValueError) as exc:
    raise UserError(f"cannot read {config_path!r}: {exc}") from exc


# Keys that may change between a run and its resumption: they change logging, the mesh, memory use or
# the length of the run, not the function the remaining steps compute (gradient accumulation changes
# only the float summation order).
RESUME_SAFE_KEYS = ("num_train_steps", "log_every_steps", "checkpoint_every_steps", "sample_every_steps",
                    "max_checkpoints_to_keep", "keep_best_checkpoints", "max_consecutive_nonfinite_steps",
                    "gradient_accumulation_steps", "eval_num_examples", "dataset.data_dir",
                    "model.remat_policy", "mesh.", "sampling.")


def _same_value(a: Any, b: Any) -> bool:
  """Equality where NaN equals NaN (a config saved with NaN must not read as changed from itself)."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
    return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
  return a == b


def check_resumable(config, workdir: str) -> None:
  """Raises UserError when `workdir` holds checkpoints of a run whose config differs from `config` in
  keys that would make the resumed run silently different (model, data, optimizer, diffusion, seed)."""
  path = os.path.join(workdir, CONFIG_FILE)
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.isfile(path) or not os.path.isdir(checkpoints) or not os.listdir(checkpoints):
    return
  old = config_lib.flatten(read_config(workdir))
  new = config_lib.flatten(config)
  changed = {k: (old.get(k), v) for k, v in new.items() if not _same_value(old.get(k), v)}
  breaking = {k: d for k, d in changed.items() if not k.startswith(RESUME_SAFE_KEYS)}
  if breaking:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(breaking.items()))
    raise UserError(f"{workdir} holds checkpoints of a run with a different config, which would not resume "
                    f"the same run: {listed}. Use a new --workdir, or pass the old values")
  if changed:
    logging.warning("Resuming with changed settings: %s", {k: f"{a!r} -> {b!r}" for k, (a, b) in changed.items()})
  if "num_train_steps" in changed and config.optimizer.schedule == "cosine":
    logging.warning("num_train_steps changed: the cosine learning-rate schedule now decays over %d steps.",
                    config.num_train_steps)


# The settings that determine the metrics, in the order they lead a record.
SETTINGS = ("step", "num_samples", "sampler", "steps", "seed", "feature_network", "reference", "nll_timesteps",
            "nll_variance")


def eval_settings(step: int, *, num_samples: int, steps: int, seed: int, nll_timesteps: int, nll_variance: str,
                  sampler: str = "ddim", feature_network: str = "", reference: str = "") -> dict[str, Any]:
  """The settings of one evaluation as recorded; the NLL ones only if it computes the NLL (nll_timesteps >= 0).

  reference: what the samples are compared with ('<dataset>/<split>' or the --reference_stats file)."""
  settings = {"step": step, "num_samples": num_samples, "sampler": sampler, "steps": steps, "seed": seed,
              "feature_network": feature_network, "reference": reference}
  if nll_timesteps >= 0:
    settings.update(nll_timesteps=nll_timesteps, nll_variance=nll_variance)
  return settings


def changed_settings(old: dict[str, Any], settings: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{name: (old value, new value)} for each of `settings` that the `old` record holds with another value."""
  return {k: (old[k], v) for k, v in settings.items() if k in old and old[k] != v}


def merge_records(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
  """`old` with `new`'s settings and metrics added or updated; the settings first, in SETTINGS order."""
  merged = {**old, **new}
  settings = {k: merged[k] for k in SETTINGS if k in merged}
  return {**settings, **{k: v for k, v in merged.items() if k not in settings}}


def metrics_path(workdir: str, out: str | None, step: int) -> str:
  """--out (an existing directory, or a path ending in '/', gets <step>.json inside) or <workdir>/eval/<step>.json."""
  if out is None:
    return os.path.join(os.path.abspath(workdir), "eval", f"{step}.json")
  if os.path.isdir(out) or out.endswith(os.sep):
    return os.path.join(os.path.abspath(out), f"{step}.json")
  return os.path.abspath(out)


def read_record(path: str) -> dict[str, Any] | None:
  """The metrics record at `path`, or None if there is none."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    if not isinstance(record, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as exc:
    raise UserError(f"cannot read the metrics in {path!r} ({exc}); pass --overwrite to replace them "
                    f"or --out=PATH to write elsewhere") from exc
  return record


def write_record(path: str, record: dict[str, Any]) -> None:
  """Writes `record` to `path` atomically: a reader sees the old file or the new one, never half of one."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)
