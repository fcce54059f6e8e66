"""The Inception network of FID and Inception Score, in Flax, and its weights.

FIDInceptionV3 is the 2015-12-05 InceptionV3 graph that TTUR's reference FID code runs, as pytorch-fid
reimplements it (`pytorch_fid.inception.InceptionV3(use_fid_inception=True)`): torchvision's Inception3
with the FID blocks, whose average pools leave the zero padding out of the mean (A, C, E_1) and whose last
block pools with a max (E_2). With pytorch-fid's published weights its 2048-d pool features give the FID
that papers report, and its 1008-way logits the Inception Score.

Submodules carry torchvision's names (Mixed_5b/branch1x1/conv …), so converting a PyTorch state dict is a
mechanical renaming plus transposes (`torch_to_flax`, `flax_to_torch`). `load_variables` reads either a
converted .npz (`save_variables`, or `python -m diffusion_jax.convert_inception`) or pytorch-fid's .pth file
itself, without torch, and checks every key and shape.
"""

from __future__ import annotations

import functools
import os
import zipfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import paths
from diffusion_jax.errors import UserError
from diffusion_jax.metrics import torch_checkpoint

NUM_FEATURES = 2048  # pool features: the FID's Gaussian lives in this space
NUM_LOGITS = 1008  # the 2015 graph's classes (1000 ImageNet classes + 8 unused), for the Inception Score
INPUT_SIZE = 299  # images are resized to 299×299 before the first conv

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_HELP = (f"the FID Inception weights are pytorch-fid's release file {WEIGHTS_URL} (the TTUR "
                f"2015-12-05 graph's weights); download it and pass --inception_weights=PATH (the .pth, or "
                f"an .npz from python -m diffusion_jax.convert_inception); nothing is downloaded at run time")

_BN_EPSILON = 1e-3  # TensorFlow's batch norm epsilon in the 2015 graph (torch's default is 1e-5)

Padding = tuple[tuple[int, int], tuple[int, int]]


def _pad(ph: int, pw: int) -> Padding:
  return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv (no bias) → batch norm (running statistics) → ReLU. NHWC."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = ((0, 0), (0, 0))
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=self.padding, use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TensorFlow's average pool leaves the padded zeros out of the mean (pytorch-fid: count_include_pad=False).
  return nn.avg_pool(x, (3, 3), (1, 1), padding=_pad(1, 1), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
  """Mixed_5b/c/d (35×35): 64 + 64 + 96 + pool_features channels."""
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(64, (1, 1), name="branch1x1")(x)
    branch5x5 = conv(48, (1, 1), name="branch5x5_1")(x)
    branch5x5 = conv(64, (5, 5), padding=_pad(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: 35×35 → 17×17, 384 + 96 + in channels."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(384, (3, 3), (2, 2), name="branch3x3")(x)
    branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b/c/d/e (17×17, 768 channels), factorized 7×7 convs of width channels_7x7."""
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    branch1x1 = conv(192, (1, 1), name="branch1x1")(x)
    branch7x7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    branch7x7 = conv(c7, (1, 7), padding=_pad(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=_pad(3, 0), name="branch7x7_3")(branch7x7)
    branch7x7dbl = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    branch7x7dbl = conv(c7, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
    branch7x7dbl = conv(c7, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
    branch7x7dbl = conv(c7, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
    branch7x7dbl = conv(192, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
    branch_pool = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: 17×17 → 8×8, 320 + 192 + in channels."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(192, (1, 1), name="branch3x3_1")(x)
    branch3x3 = conv(320, (3, 3), (2, 2), name="branch3x3_2")(branch3x3)
    branch7x7x3 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), padding=_pad(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=_pad(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = conv(192, (3, 3), (2, 2), name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (E_1, average pool) and Mixed_7c (E_2, max pool): 8×8, 320 + 768 + 768 + 192 = 2048 channels."""
  max_pool: bool
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(320, (1, 1), name="branch1x1")(x)
    branch3x3 = conv(384, (1, 1), name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([
        conv(384, (1, 3), padding=_pad(0, 1), name="branch3x3_2a")(branch3x3),
        conv(384, (3, 1), padding=_pad(1, 0), name="branch3x3_2b")(branch3x3)], axis=-1)
    branch3x3dbl = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(384, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([
        conv(384, (1, 3), padding=_pad(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
        conv(384, (3, 1), padding=_pad(1, 0), name="branch3x3dbl_3b")(branch3x3dbl)], axis=-1)
    if self.max_pool:
      # The FID graph's last block pools with a max (the paper and torchvision average): kept for parity.
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=_pad(1, 1))
    else:
      pooled = _avg_pool_3x3(x)
    branch_pool = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


def preprocess(images: jax.Array) -> jax.Array:
  """float [N, H, W, 3] in [0, 255] → float32 [N, 299, 299, 3] in [-1, 1], as pytorch-fid does it.

  Bilinear resize with half-pixel centers and no antialiasing (torch's F.interpolate(mode='bilinear',
  align_corners=False), which pytorch-fid applies even when downsampling), then x/255 mapped to 2x − 1.
  """
  images = jnp.asarray(images, jnp.float32)
  n, h, w, _ = images.shape
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    images = jax.image.resize(images, (n, INPUT_SIZE, INPUT_SIZE, images.shape[-1]), "bilinear",
                              antialias=False)
  return 2.0 * (images / 255.0) - 1.0


class FIDInceptionV3(nn.Module):
  """The FID Inception network (pytorch-fid's InceptionV3 with resize_input and normalize_input). NHWC.

  `precision` is the conv/dense precision: the default HIGHEST keeps float32 accuracy on accelerators whose
  default matmul precision is lower (TF32, bfloat16 passes), so features match the float32 reference.
  """
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array, return_blocks: bool = False) -> dict[str, Any]:
    """images: float [N, H, W, 3] with values in [0, 255], any H, W (RGB; grayscale is the caller's job).

    Returns {'pool': float32 [N, 2048], 'logits': float32 [N, 1008]} and, with return_blocks, 'blocks':
    pytorch-fid's four block outputs, NHWC: [N, 73, 73, 64], [N, 35, 35, 192], [N, 17, 17, 768] and
    [N, 1, 1, 2048] (block 3 is after the global average pool, so its pixels are 'pool').
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise UserError(f"FIDInceptionV3 takes images [N, H, W, 3]; got shape {tuple(images.shape)}")
    conv = functools.partial(BasicConv2d, precision=self.precision)
    x = preprocess(images)
    # Block 0: the stem, to the first max pool.
    x = conv(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=_pad(1, 1), name="Conv2d_2b_3x3")(x)
    block0 = x = _max_pool_3x3_s2(x)
    # Block 1: to the second max pool.
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    block1 = x = _max_pool_3x3_s2(x)
    # Block 2: to where the auxiliary classifier would branch off.
    x = FIDInceptionA(32, self.precision, name="Mixed_5b")(x)
    x = FIDInceptionA(64, self.precision, name="Mixed_5c")(x)
    x = FIDInceptionA(64, self.precision, name="Mixed_5d")(x)
    x = InceptionB(self.precision, name="Mixed_6a")(x)
    x = FIDInceptionC(128, self.precision, name="Mixed_6b")(x)
    x = FIDInceptionC(160, self.precision, name="Mixed_6c")(x)
    x = FIDInceptionC(160, self.precision, name="Mixed_6d")(x)
    block2 = x = FIDInceptionC(192, self.precision, name="Mixed_6e")(x)
    # Block 3: to the global average pool.
    x = InceptionD(self.precision, name="Mixed_7a")(x)
    x = FIDInceptionE(False, self.precision, name="Mixed_7b")(x)
    x = FIDInceptionE(True, self.precision, name="Mixed_7c")(x)
    block3 = jnp.mean(x, axis=(1, 2), keepdims=True)
    pool = block3[:, 0, 0, :]
    # torchvision's dropout before fc is the identity at inference.
    logits = nn.Dense(NUM_LOGITS, precision=self.precision, name="fc")(pool)
    out = {"pool": pool, "logits": logits}
    if return_blocks:
      out["blocks"] = (block0, block1, block2, block3)
    return out


# ---- Weights: PyTorch state dict ⇄ Flax variables -------------------------------------------------------

# (torch module kind, torch leaf) → (Flax collection, Flax leaf). The kind is the last module name.
_TORCH_TO_FLAX = {
    ("conv", "weight"): ("params", "kernel"),
    ("bn", "weight"): ("params", "scale"),
    ("bn", "bias"): ("params", "bias"),
    ("bn", "running_mean"): ("batch_stats", "mean"),
    ("bn", "running_var"): ("batch_stats", "var"),
    ("fc", "weight"): ("params", "kernel"),
    ("fc", "bias"): ("params", "bias"),
}
_FLAX_TO_TORCH = {(kind, collection, flax_leaf): torch_leaf
                  for (kind, torch_leaf), (collection, flax_leaf) in _TORCH_TO_FLAX.items()}
_IGNORED = "num_batches_tracked"  # a training counter of torch's BatchNorm; inference does not use it


def _to_flax_layout(kind: str, leaf: str, array: np.ndarray) -> np.ndarray:
  """conv weight [O, I, kh, kw] → kernel [kh, kw, I, O]; fc weight [out, in] → kernel [in, out]."""
  if leaf == "weight" and kind == "conv":
    return np.transpose(array, (2, 3, 1, 0))
  if leaf == "weight" and kind == "fc":
    return np.transpose(array)
  return array


def _to_torch_layout(kind: str, leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and kind == "conv":
    return np.transpose(array, (3, 2, 0, 1))
  if leaf == "kernel" and kind == "fc":
    return np.transpose(array)
  return array


def _torch_key_to_flax(key: str) -> tuple[str, tuple[str, ...]] | None:
  """'Mixed_5b.branch1x1.conv.weight' → ('params', ('Mixed_5b', 'branch1x1', 'conv', 'kernel'))."""
  *modules, leaf = key.split(".")
  if not modules or (modules[-1], leaf) not in _TORCH_TO_FLAX:
    return None
  collection, flax_leaf = _TORCH_TO_FLAX[(modules[-1], leaf)]
  return collection, (*modules, flax_leaf)


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items"):
      flat.update(_flatten(dict(value), (*prefix, str(key))))
    else:
      flat[(*prefix, str(key))] = value
  return flat


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[str, tuple[int, ...]]:
  """{'params/Mixed_5b/branch1x1/conv/kernel': shape, …} of the module, from an abstract init (no compute)."""
  abstract = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  return {"/".join(path): tuple(leaf.shape) for path, leaf in _flatten(abstract).items()}


@functools.lru_cache(maxsize=1)
def _expected_torch_shapes() -> dict[str, tuple[int, ...]]:
  """The same, named and laid out as pytorch-fid's state dict ('Mixed_5b.branch1x1.conv.weight': [O, I, kh, kw])."""
  shapes = {}
  for name, shape in _expected_shapes().items():
    collection, *modules, leaf = name.split("/")
    dummy = np.empty(shape, np.bool_)
    key = ".".join((*modules, _FLAX_TO_TORCH[(modules[-1], collection, leaf)]))
    shapes[key] = _to_torch_layout(modules[-1], leaf, dummy).shape
  return shapes


def num_parameters(variables: dict) -> int:
  """Number of scalars in `variables` (params and batch statistics)."""
  return int(sum(np.size(leaf) for leaf in _flatten(variables).values()))


def _check(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: str) -> None:
  """One-line UserError naming the first missing key, unexpected key or wrong shape in `found`."""
  problems = []
  for key in expected:
    if key not in found:
      problems.append(f"key {key!r} (shape {expected[key]}) is missing")
    elif tuple(found[key]) != tuple(expected[key]):
      problems.append(f"key {key!r} has shape {tuple(found[key])}, expected {tuple(expected[key])}")
  for key in found:
    if key not in expected:
      problems.append(f"unexpected key {key!r} (shape {tuple(found[key])}): the FID Inception has no such "
                      f"parameter")
  if problems:
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    raise UserError(f"{source}: {problems[0]}{more}; expected pytorch-fid's FID Inception weights "
                    f"({os.path.basename(WEIGHTS_URL)}) or their conversion")


def torch_to_flax(state_dict: dict[str, np.ndarray], source: str = "the Inception state dict") -> dict:
  """pytorch-fid's (torchvision-named) state dict → Flax variables {'params': …, 'batch_stats': …}.

  Conv weights [O, I, kh, kw] become kernels [kh, kw, I, O]; fc weight [1008, 2048] a Dense kernel
  [2048, 1008]; BatchNorm weight/bias/running_mean/running_var become scale/bias/mean/var;
  num_batches_tracked is dropped. Keys and shapes are checked first (UserError naming `source` and the
  key); values keep their dtype, so float32 weights convert exactly.
  """
  tensors = {k: np.asarray(v) for k, v in state_dict.items() if k.split(".")[-1] != _IGNORED}
  _check({k: v.shape for k, v in tensors.items()}, _expected_torch_shapes(), source)
  flat = {}
  for key, array in tensors.items():
    collection, path = _torch_key_to_flax(key)
    flat[(collection, *path)] = _to_flax_layout(path[-2], key.split(".")[-1], array)
  return _unflatten(flat)


def flax_to_torch(variables: dict) -> dict[str, np.ndarray]:
  """The inverse of torch_to_flax: Flax variables → {torchvision name: array} (without num_batches_tracked)."""
  state_dict = {}
  for (collection, *modules, leaf), array in _flatten(variables).items():
    torch_leaf = _FLAX_TO_TORCH.get((modules[-1] if modules else "", collection, leaf))
    if torch_leaf is None:
      raise UserError(f"Flax variable {'/'.join((collection, *modules, leaf))!r} has no PyTorch counterpart")
    state_dict[".".join((*modules, torch_leaf))] = _to_torch_layout(modules[-1], leaf, np.asarray(array))
  return state_dict


def save_variables(path: str, variables: dict) -> None:
  """Writes `variables` to the .npz `path` ('params/Mixed_5b/branch1x1/conv/kernel', … keys), atomically."""
  flat = {"/".join(k): np.asarray(v) for k, v in _flatten(variables).items()}
  paths.write_npz_atomic(path, flat)


def _is_npz(path: str) -> bool:
  """An .npz is a zip of .npy members; torch.save's zip holds <name>/data.pkl instead."""
  if not zipfile.is_zipfile(path):
    return False
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
  except (zipfile.BadZipFile, OSError):
    return False
  return bool(names) and all(n.endswith(".npy") for n in names)


def load_variables(path: str) -> dict:
  """Flax variables of FIDInceptionV3 from a converted .npz or pytorch-fid's .pth (read without torch).

  Every key and shape is checked against the module: a missing or unreadable file, a missing or unexpected
  key, or a wrong shape raises a one-line UserError naming the path and the key.
  """
  if not os.path.isfile(path):
    raise UserError(f"Inception weights {path!r} do not exist; {WEIGHTS_HELP}")
  if not _is_npz(path):
    try:
      state_dict = torch_checkpoint.read_state_dict(path)
    except UserError as exc:
      raise UserError(f"{exc}; {WEIGHTS_HELP}") from None
    return torch_to_flax(state_dict, source=f"Inception weights {path!r}")
  try:
    with np.load(path, allow_pickle=False) as npz:
      flat = {name: npz[name] for name in npz.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
    raise UserError(f"Inception weights {path!r} are not a readable .npz: {' '.join(str(exc).split())}; "
                    f"{WEIGHTS_HELP}") from None
  _check({k: v.shape for k, v in flat.items()}, _expected_shapes(), f"Inception weights {path!r}")
  return _unflatten({tuple(k.split("/")): v for k, v in flat.items()})


def forward_fn(variables: dict, return_blocks: bool = False) -> Any:
  """A jitted images [N, H, W, 3] in [0, 255] → outputs of FIDInceptionV3 with `variables` (compiled per shape)."""
  model = FIDInceptionV3()
  # The weights are an argument, not constants closed over: 24M of them would bloat the compiled program.
  forward = jax.jit(lambda v, images: model.apply(v, images, return_blocks=return_blocks))
  return functools.partial(forward, variables)
