"""Metric writers: clu's TensorBoard + logging writers, plus `metrics.jsonl` (one JSON object per step)."""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers

from diffusion_jax import paths


class JsonlWriter(metric_writers.MetricWriter):
  """Appends `{"step": …, name: value, …}` lines to a file; only scalars are written.

  drop_steps_after: a resumed run first removes the rows of steps after its checkpoint (the steps it
  is about to redo), so the file holds one row per step and metric as if the run had never stopped.
  Object stores cannot append: at a URL the file is rewritten whole (one small object) at each write.
  """

  def __init__(self, path: paths.PathLike, drop_steps_after: int | None = None):
    self._path = paths.resolve(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)
    if drop_steps_after is not None and self._path.is_file():
      _drop_rows_after(self._path, drop_steps_after)
    self._appendable = paths.is_local(self._path)
    if self._appendable:
      self._file = open(self._path, "a", encoding="utf-8")
    else:
      self._lines = self._path.read_text(encoding="utf-8").splitlines(keepends=True) if self._path.exists() else []

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    line = json.dumps(record) + "\n"
    if self._appendable:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      paths.write_text_atomic(self._path, "".join(self._lines))

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    if self._appendable:
      self._file.flush()

  def close(self):
    if self._appendable:
      self._file.close()


def _drop_rows_after(path: paths.epath.Path, step: int) -> None:
  """Rewrites `path` (atomically) without the rows of steps > `step`; a torn last line goes too."""
  kept, dropped = [], 0
  for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
    try:
      row_step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      dropped += 1  # A line cut short by a kill.
      continue
    if row_step <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
    else:
      dropped += 1
  if dropped:
    paths.write_text_atomic(path, "".join(kept))


def create_writer(workdir: paths.PathLike, drop_steps_after: int | None = None) -> metric_writers.MetricWriter:
  """Process 0 writes TensorBoard events and metrics.jsonl in `workdir`; other processes only log.

  drop_steps_after: the step a resumed run starts from; metrics.jsonl rows of later steps are removed.
  """
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True)
  workdir = paths.resolve(workdir)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(str(workdir), asynchronous=False),  # TensorFlow's file systems.
      JsonlWriter(workdir / "metrics.jsonl", drop_steps_after),
  ])
