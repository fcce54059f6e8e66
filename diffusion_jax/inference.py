"""Loading a trained model for sampling and evaluation, from a training workdir or an exported directory.

- A training workdir: `config.json` + `checkpoints/<step>/`; only the EMA parameters are read from
  the checkpoint (not the optimizer state or the raw parameters).
- An exported directory (`python -m diffusion_jax.export`): `config.json` + `params/` (the EMA
  parameters alone) + `export.json` {'step', 'source', 'num_params', 'params_fingerprint'}.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from diffusion_jax import build, generation, paths, run_files, train_state
from diffusion_jax.checkpoint import Checkpointer, fingerprint
from diffusion_jax.errors import UserError
from diffusion_jax.parallel import mesh as mesh_lib

EXPORT_MANIFEST = "export.json"


@dataclasses.dataclass
class LoadedModel:
  """A trained model ready to sample: its run's pieces (`run.config`, `run.model`, `run.conditioning`, …)
  built for inference, the EMA parameters on the host, and the checkpoint step they come from."""

  run: build.Run
  params: Any
  step: int

  @property
  def config(self):
    return self.run.config


def is_export(path: paths.PathLike) -> bool:
  return (paths.resolve(path) / EXPORT_MANIFEST).is_file()


def _read_manifest(path: paths.PathLike) -> dict[str, Any]:
  return json.loads((paths.resolve(path) / EXPORT_MANIFEST).read_text(encoding="utf-8"))


read_config = run_files.read_config


def build_for_inference(config) -> build.Run:
  """The run's pieces on a data-parallel mesh of the local devices, so that parameters trained on any
  mesh load here (`config` itself is not changed)."""
  return build.build(config, mesh_shape=(-1, 1, 1))


def _check_finite(params: Any, where: str) -> None:
  """Parameters that hold NaN or inf would give black images with exit status 0: refuse them."""
  bad = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
         if not np.isfinite(np.asarray(leaf)).all()]
  if bad:
    raise UserError(f"the parameters in {where} hold NaN or inf ({len(bad)} leaves, e.g. {bad[0]}); "
                    f"they cannot sample. Use an earlier checkpoint (--step) or retrain")


def _load_export(path: paths.PathLike, step: int | None, abstract_params: Any) -> tuple[Any, int]:
  manifest = _read_manifest(path)
  if step is not None and step != manifest["step"]:
    raise UserError(f"{path!r} is an export of step {manifest['step']}; --step={step} does not exist there")
  try:
    params = ocp.StandardCheckpointer().restore(paths.resolve(path) / "params", abstract_params)
    ok = fingerprint(params) == manifest["params_fingerprint"]
  except Exception as exc:  # pylint: disable=broad-except  (unreadable files: the same answer)
    raise UserError(f"the parameters in {path!r} cannot be read ({type(exc).__name__}: {str(exc)[:200]}): "
                    f"the files are damaged; export again") from exc
  if not ok:
    raise UserError(f"the parameters in {path!r} do not match the fingerprint in its {EXPORT_MANIFEST}: "
                    f"the files are damaged; export again")
  return params, manifest["step"]


def _load_checkpoint(path: str, step: int | None, abstract_state: Any) -> tuple[Any, int]:
  """EMA parameters of checkpoint `step`, verified against the checkpoint's fingerprint.

  With no step, the newest checkpoint that verifies is used; damaged ones are skipped with a warning
  but left in place (a reader must not change a workdir that a training run may be using).
  """
  checkpointer = Checkpointer(path, read_only=True)
  try:
    steps = checkpointer.all_steps()
    restore = lambda s: checkpointer.restore_subtree(s, "ema_params", abstract_state)
    if step is not None:
      checkpointer.check_step(step)
      params, error = checkpointer.attempt_restore(restore, step)
      if error is not None:  # Unreadable or wrong bytes: damaged.
        raise UserError(f"checkpoint step {step} in {checkpointer.directory} is damaged ({type(error).__name__}: "
                        f"{' '.join(str(error).split())[:200]}); choose another --step from {steps}") from error
      return params, step
    if not steps:
      checkpointer.refuse_if_only_damaged_remain()
      raise UserError(f"no checkpoint in {checkpointer.directory!r}; train first")
    good_step, params = checkpointer.restore_latest_good(restore, move_damaged=False)
    if good_step != max(steps):
      logging.warning("Using checkpoint step %d: the newer ones are damaged (see above).", good_step)
    return params, good_step
  finally:
    checkpointer.close()


def load(path: str, step: int | None = None) -> LoadedModel:
  """EMA parameters from a training workdir (checkpoint `step`, default the newest good one) or an export.

  Every path verifies the parameters against the fingerprint saved with them, and refuses
  parameters that hold NaN or inf.
  """
  run = build_for_inference(read_config(path))
  params, step = load_params(run, path, step)
  return LoadedModel(run, params, step)


def load_params(run: build.Run, path: str, step: int | None = None) -> tuple[Any, int]:
  """(EMA parameters on the host, their step) of `path` for an already built `run` (evaluating several
  checkpoints builds, and compiles, once). Verified as in `load`."""
  abstract_state = run.abstract_state(replicate_indivisible=True)
  if is_export(path):
    params, step = _load_export(path, step, abstract_state.ema_params)
  else:
    params, step = _load_checkpoint(path, step, abstract_state)
  params = jax.device_get(params)
  _check_finite(params, f"{path!r} (step {step})")
  return params, step


def generate(run: build.Run, sample_fn, params: Any, requests, guidance_scale: float, seed: int,
             negative_prompt: str = "") -> np.ndarray:
  """generation.generate with host `params` (as `load_params` returns them) laid out on `run.mesh` as
  training lays out its EMA parameters, and the mesh active: the program is then training's grid sampler,
  which the persistent compilation cache holds, instead of a second compile."""
  shardings = jax.tree.map(lambda a: a.sharding, run.abstract_state(replicate_indivisible=True).ema_params)
  place = lambda x, sharding: jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x)[index])
  with mesh_lib.activate(run.mesh, run.rules):
    return generation.generate(sample_fn, jax.tree.map(place, params, shardings), run.conditioning, requests,
                               guidance_scale, seed, negative_prompt)


def checkpoint_steps(path: str) -> list[int]:
  """The steps `path` holds: its checkpoints' (a workdir) or the exported step (an export)."""
  if is_export(path):
    return [_read_manifest(path)["step"]]
  checkpointer = Checkpointer(path, read_only=True)
  try:
    return list(checkpointer.all_steps())
  finally:
    checkpointer.close()


def follow_checkpoints(path: str, final_step: int, *, is_done: Callable[[int], bool],
                       evaluate: Callable[[int], Any], follow: bool, poll_seconds: float, timeout: float,
                       sleep: Callable[[float], None] = time.sleep) -> list[int]:
  """Calls `evaluate(step)` for each checkpoint of `path` that is not `is_done`, oldest first; with
  `follow`, keeps looking every `poll_seconds` for new ones (a running training) until `final_step` is
  done or `timeout` seconds pass without a new checkpoint. Returns the steps evaluated (or tried), in order."""
  evaluated, last_new = [], time.monotonic()
  while True:
    for step in [s for s in checkpoint_steps(path) if s not in evaluated and not is_done(s)]:
      evaluate(step)  # Each step once: one that fails (damaged) is not retried at every look.
      evaluated.append(step)
      last_new = time.monotonic()
    if final_step in evaluated or is_done(final_step):
      logging.info("The run's last step (%d) is evaluated; done.", final_step)
      return evaluated
    if not follow or is_export(path):  # An export never changes.
      return evaluated
    if time.monotonic() - last_new > timeout:
      logging.warning("No new checkpoint for %.0f s; stopping.", timeout)
      return evaluated
    sleep(poll_seconds)


def export(workdir: paths.PathLike, out: paths.PathLike, step: int | None = None) -> paths.epath.Path:
  """Writes the EMA parameters of `workdir`'s checkpoint `step` (default: the latest) to `out`."""
  loaded = load(workdir, step)
  out = paths.resolve(out)
  if (out / "params").exists():
    raise UserError(f"{str(out)!r} already holds an export; choose another --out or remove it")
  out.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out / "params", loaded.params)
  checkpointer.wait_until_finished()
  run_files.write_config(loaded.config, out)
  manifest = {"step": loaded.step, "source": str(paths.resolve(workdir)),
              "num_params": train_state.param_count(loaded.params),
              "params_fingerprint": fingerprint(loaded.params)}
  # The manifest comes last: a directory without it is not (yet) an export.
  paths.write_text_atomic(out / EXPORT_MANIFEST, json.dumps(manifest, indent=1))
  return out
