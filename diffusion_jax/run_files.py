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
from diffusion_jax import paths
from diffusion_jax.errors import UserError

CONFIG_FILE = "config.json"


def write_config(config, directory: paths.PathLike) -> None:
  """Writes directory/config.json atomically: a reader sees the old file or the new one, never half."""
  paths.write_text_atomic(paths.resolve(directory) / CONFIG_FILE, config_lib.to_json(config))


def read_config(path: paths.PathLike):
  """The config of a training workdir or an exported directory, merged onto today's defaults."""
  resolved, shown = paths.resolve(path), os.fspath(path)
  if not resolved.exists():
    raise UserError(f"{shown!r} does not exist; pass the --workdir of a training run or an exported directory")
  if not resolved.is_dir():
    raise UserError(f"{shown!r} is not a directory; pass the --workdir of a training run or an exported directory")
  config_path = resolved / CONFIG_FILE
  if not config_path.is_file():
    raise UserError(f"{str(config_path)!r} does not exist; is {shown!r} a training workdir or an exported "
                    f"directory?")
  try:
    return config_lib.with_defaults(config_lib.from_json(config_path.read_text(encoding="utf-8")))
  except (OSError, ValueError) as exc:
    raise UserError(f"cannot read {str(config_path)!r}: {exc}") from exc


# Keys that may change between a run and its resumption: they change logging, the mesh, memory use or
# the length of the run, not the function the remaining steps compute (gradient accumulation changes
# only the float summation order).
RESUME_SAFE_KEYS = ("num_train_steps", "log_every_steps", "checkpoint_every_steps", "sample_every_steps",
                    "max_checkpoints_to_keep", "keep_best_checkpoints", "max_consecutive_nonfinite_steps",
                    "gradient_accumulation_steps", "auto_gradient_accumulation", "eval_num_examples",
                    "dataset.data_dir", "dataset.cache_in_memory",
                    "model.remat_policy", "model.attention", "mesh.", "sampling.")


def _same_value(a: Any, b: Any) -> bool:
  """Equality where NaN equals NaN (a config saved with NaN must not read as changed from itself)."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
    return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
  return a == b


def check_resumable(config, workdir: paths.PathLike) -> None:
  """Raises UserError when `workdir` holds checkpoints of a run whose config differs from `config` in
  keys that would make the resumed run silently different (model, data, optimizer, diffusion, seed)."""
  resolved = paths.resolve(workdir)
  checkpoints = resolved / "checkpoints"
  if not (resolved / CONFIG_FILE).is_file() or not checkpoints.is_dir() or not any(checkpoints.iterdir()):
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


def metrics_path(workdir: paths.PathLike, out: str | None, step: int) -> paths.epath.Path:
  """--out (an existing directory, or a path ending in '/', gets <step>.json inside) or <workdir>/eval/<step>.json."""
  if out is None:
    return paths.resolve(workdir) / "eval" / f"{step}.json"
  if out.endswith(("/", os.sep)) or paths.resolve(out).is_dir():
    return paths.resolve(out) / f"{step}.json"
  return paths.resolve(out)


def read_record(path: paths.PathLike) -> dict[str, Any] | None:
  """The metrics record at `path`, or None if there is none."""
  path = paths.resolve(path)
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as exc:
    raise UserError(f"cannot read the metrics in {str(path)!r} ({exc}); pass --overwrite to replace them "
                    f"or --out=PATH to write elsewhere") from exc
  return record


def write_record(path: paths.PathLike, record: dict[str, Any]) -> None:
  """Writes `record` to `path` atomically: a reader sees the old file or the new one, never half of one."""
  paths.write_text_atomic(path, json.dumps(record, indent=2))
