"""The guidance sweep as a PNG: the Fréchet distance against precision, recall and accuracy, one point per
guidance scale (the trade-off curve of classifier-free guidance papers: fidelity up, diversity down)."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from diffusion_jax import paths


def plot_guidance_sweep(path: paths.PathLike, scales: Sequence[float], fd: Sequence[float],
                        others: dict[str, Sequence[float]], *, fd_name: str = "fd", title: str = "") -> str:
  """Writes one panel per entry of `others` ({'precision': [...], 'recall': [...], ...}, one value per
  scale): x = that metric, y = the Fréchet distance, each point labelled with its scale. Returns `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (plotting only; no display needed)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = [(name, values) for name, values in others.items() if values is not None]
  fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.6), squeeze=False)
  order = np.argsort(scales)
  for ax, (name, values) in zip(axes[0], panels):
    x, y = np.asarray(values)[order], np.asarray(fd)[order]
    ax.plot(x, y, "-o", color="tab:blue")
    for scale, xi, yi in zip(np.asarray(scales)[order], x, y):
      ax.annotate(f"s={scale:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(name)
    ax.set_ylabel(fd_name.upper())
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  paths.write_bytes_atomic(path, buffer.getvalue())
  return path
