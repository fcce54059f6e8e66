"""Metric writers: clu's TensorBoard + logging writers, plus `metrics.jsonl` (one JSON object per step)."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Appends `{"step": …, name: value, …}` lines to a file; only scalars are written.

  drop_steps_after: a resumed run first removes the rows of steps after its checkpoint (the steps it
  is about to redo), so the file holds one row per step and metric as if the run had never stopped.
  """

  def __init__(self, path: str, drop_steps_after: int | None = None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if drop_steps_after is not None and os.path.isfile(path):
      _drop_rows_after(path, drop_steps_after)
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

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
    self._file.flush()

  def close(self):
    self._file.close()


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites `path` (atomically) without the rows of steps > `step`; a torn last line goes too."""
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
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
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def create_writer(workdir: str, drop_steps_after: int | None = None) -> metric_writers.MetricWriter:
  """Process 0 writes TensorBoard events and metrics.jsonl in `workdir`; other processes only log.

  drop_steps_after: the step a resumed run starts from; metrics.jsonl rows of later steps are removed.
  """
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl"), drop_steps_after),
  ])
