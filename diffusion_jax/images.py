"""Conversions between model images ([-1, 1] float) and uint8, grids and PNG files."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from diffusion_jax import paths


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float → uint8 [0, 255] (values outside are clipped)."""
  return np.round((np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def to_model_range(images_uint8):
  """uint8 [0, 255] → float32 [-1, 1]. Works on numpy and jax arrays."""
  return images_uint8.astype("float32") / 127.5 - 1.0


def make_grid(images: np.ndarray, num_rows: int, upscale: int = 1, pad: int = 1) -> np.ndarray:
  """[N, H, W, C] uint8 → one [rows·(H·up+pad)+pad, cols·(W·up+pad)+pad, C] uint8 image, row-major.

  `upscale` repeats pixels (nearest neighbour) so that tiny images stay visible.
  """
  images = np.asarray(images)
  n, h, w, c = images.shape
  cols = -(-n // num_rows)
  images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
  h, w = h * upscale, w * upscale
  grid = np.full((num_rows * (h + pad) + pad, cols * (w + pad) + pad, c), 128, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
  return grid


def save_png(path: paths.PathLike, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, 1|3] image atomically (a crash never leaves half a PNG), locally or at a URL."""
  image = np.asarray(image)
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  paths.write_bytes_atomic(path, buffer.getvalue())


def save_grid(path: paths.PathLike, images: np.ndarray, num_rows: int) -> np.ndarray:
  """Writes uint8 images [N, H, W, C] as a PNG grid of `num_rows` rows (small images upscaled to about
  32 pixels, so 8×8 digits stay visible); returns the grid."""
  upscale = max(1, 32 // int(np.asarray(images).shape[1]))
  grid = make_grid(images, num_rows=num_rows, upscale=upscale)
  save_png(path, grid)
  return grid
