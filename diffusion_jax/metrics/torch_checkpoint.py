"""Reads a PyTorch state dict (a `torch.save` file) into numpy arrays without importing torch.

Both of torch.save's formats are read: the zip archive (torch >= 1.6: `<name>/data.pkl` plus one raw
storage per `<name>/data/<key>` entry and a `<name>/byteorder` file) and the legacy stream
(`_use_new_zipfile_serialization=False`, and every file written before 1.6: magic number, protocol and
sys_info pickles, the object pickle, the sorted storage keys, then for each storage an 8-byte
little-endian element count and its raw bytes).

The pickle is read with an unpickler that resolves only the handful of globals a state dict of tensors
uses (OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter, torch.*Storage): a weights
file must not be able to run code.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np

from diffusion_jax.errors import UserError

# torch.<Name>Storage → numpy dtype of its elements (torch.save stores them in native byte order).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# numpy has no bfloat16: its storage is read as uint16 bits and widened to float32 (exact).
_BFLOAT16 = "BFloat16Storage"

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
  """Stands in for torch.<name>Storage in the pickle: only its name (hence dtype) is used."""

  def __init__(self, name: str):
    self.name = name

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _Storage:
  """A storage's elements as a 1-D numpy array (dtype from its storage type)."""

  def __init__(self, array: np.ndarray, bfloat16: bool = False):
    self.array, self.bfloat16 = array, bfloat16


def _element_size(storage_type: _StorageType) -> int:
  return 2 if storage_type.name == _BFLOAT16 else _STORAGE_DTYPES[storage_type.name].itemsize


def _as_storage(raw: bytes, storage_type: _StorageType, big_endian: bool) -> _Storage:
  if storage_type.name == _BFLOAT16:
    return _Storage(np.frombuffer(raw, np.dtype(">u2" if big_endian else "<u2")), bfloat16=True)
  dtype = _STORAGE_DTYPES[storage_type.name]
  return _Storage(np.frombuffer(raw, dtype.newbyteorder(">" if big_endian else "<")))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 for a numpy storage: the strided view, copied to its own array."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f"a tensor refers to {type(storage).__name__}, not a storage")
  array = storage.array
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  # The last element the view touches must lie inside the storage (as_strided does not check).
  if any(s < 0 for s in size + stride) or storage_offset < 0:
    raise pickle.UnpicklingError(f"negative size {size}, stride {stride} or offset {storage_offset}")
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else -1
  if last >= array.size:
    raise pickle.UnpicklingError(f"a tensor of size {size} at offset {storage_offset} overruns its storage "
                                 f"of {array.size} elements")
  view = np.lib.stride_tricks.as_strided(array[storage_offset:], shape=size,
                                         strides=tuple(s * array.itemsize for s in stride))
  out = np.array(view, dtype=array.dtype.newbyteorder("="))
  if storage.bfloat16:  # bfloat16 is the upper half of a float32.
    out = (out.astype(np.uint32) << 16).view(np.float32)
  return out


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args) -> np.ndarray:
  del requires_grad, backward_hooks, args
  return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in (*_STORAGE_DTYPES, _BFLOAT16)},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals in _ALLOWED; storages come from `load_storage(type, key, numel)`."""

  def __init__(self, file: BinaryIO, load_storage: Callable[[_StorageType, str, int], _Storage]):
    super().__init__(file)
    self._load_storage = load_storage
    self._views: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(f"it refers to the global {module}.{name}, which a state dict of tensors "
                                   f"does not use (refused: unpickling it could run code)") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and _ascii(pid[0]) == "storage"):
      raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"a storage of type {storage_type!r}")
    storage = self._load_storage(storage_type, _ascii(key), int(numel))
    view = pid[5] if len(pid) > 5 else None
    if view is None:
      return storage
    # Pre-1.0 files could hold views into a storage: (view key, element offset, element count).
    view_key, offset, view_size = view
    return _Storage(storage.array[int(offset):int(offset) + int(view_size)], storage.bfloat16)


def _ascii(value) -> str:
  return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _read_zip(archive: zipfile.ZipFile) -> Any:
  pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise pickle.UnpicklingError("a zip archive without <name>/data.pkl (not written by torch.save)")
  prefix = pickles[0][:-len("data.pkl")]
  names = set(archive.namelist())
  big_endian = (prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() == b"big")
  storages: dict[str, _Storage] = {}

  def load_storage(storage_type: _StorageType, key: str, numel: int) -> _Storage:
    if key not in storages:
      name = f"{prefix}data/{key}"
      if name not in names:
        raise pickle.UnpicklingError(f"storage {name!r} is missing from the archive")
      raw = archive.read(name)
      if len(raw) < numel * _element_size(storage_type):
        raise pickle.UnpicklingError(f"storage {name!r} holds {len(raw)} bytes, fewer than {numel} elements")
      storages[key] = _as_storage(raw, storage_type, big_endian)
    return storages[key]

  with archive.open(pickles[0]) as f:
    return _RestrictedUnpickler(io.BytesIO(f.read()), load_storage).load()


def _read_legacy(f: BinaryIO) -> Any:
  """The legacy stream: the object's storages come after it, so they are bound after unpickling."""
  header = _RestrictedUnpickler(f, lambda *_: None)
  if header.load() != _LEGACY_MAGIC:
    raise pickle.UnpicklingError("no torch.save magic number")
  if header.load() != _LEGACY_PROTOCOL:
    raise pickle.UnpicklingError("an unsupported legacy protocol version")
  sys_info = header.load()
  big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
  # Placeholders that the unpickled tensors refer to; filled once the raw bytes are read.
  pending: dict[str, tuple[_StorageType, _Storage]] = {}

  def load_storage(storage_type: _StorageType, key: str, numel: int) -> _Storage:
    del numel  # the stream gives the count again, before the bytes
    if key not in pending:
      pending[key] = (storage_type, _Storage(np.zeros(0)))
    return pending[key][1]

  # The tensors must be rebuilt after their storages are read: unpickle with deferred tensors.
  deferred = _DeferredUnpickler(f, load_storage)
  obj = deferred.load()
  keys = [_ascii(k) for k in _RestrictedUnpickler(f, lambda *_: None).load()]
  for key in keys:
    if key not in pending:
      raise pickle.UnpicklingError(f"storage {key!r} is listed but no tensor uses it")
    storage_type, storage = pending[key]
    count_bytes = f.read(8)
    if len(count_bytes) != 8:
      raise pickle.UnpicklingError("the file ends before its storages")
    (numel,) = struct.unpack("<q", count_bytes)
    nbytes = numel * _element_size(storage_type)
    raw = f.read(nbytes)
    if numel < 0 or len(raw) != nbytes:
      raise pickle.UnpicklingError(f"storage {key!r} is truncated")
    filled = _as_storage(raw, storage_type, big_endian)
    storage.array, storage.bfloat16 = filled.array, filled.bfloat16
  return _resolve(obj)


class _DeferredTensor:
  def __init__(self, rebuild: Callable, args: tuple):
    self.rebuild, self.args = rebuild, args

  def resolve(self):
    args = tuple(a.resolve() if isinstance(a, _DeferredTensor) else a for a in self.args)
    return self.rebuild(*args)


class _DeferredUnpickler(_RestrictedUnpickler):
  """Like _RestrictedUnpickler but the rebuild functions return _DeferredTensor (resolved by _resolve)."""

  def find_class(self, module: str, name: str):
    found = super().find_class(module, name)
    if found in (_rebuild_tensor_v2, _rebuild_parameter):
      return lambda *args: _DeferredTensor(found, args)
    return found


def _resolve(obj):
  if isinstance(obj, _DeferredTensor):
    return obj.resolve()
  if isinstance(obj, dict):
    for key, value in obj.items():
      obj[key] = _resolve(value)
  return obj


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} of the tensors in the `torch.save` file `path` (either format; torch is not imported).

  Arrays keep the tensors' dtypes, shapes and values exactly (bfloat16 is widened to float32). A file that is
  not a torch.save'd dict of tensors, or whose pickle refers to any other global, raises UserError.
  """
  if not os.path.isfile(path):
    raise UserError(f"weights file {path!r} does not exist")
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        obj = _read_zip(archive)
    else:
      with open(path, "rb") as f:
        obj = _read_legacy(f)
  except UserError:
    raise
  except (pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile, ValueError, TypeError, KeyError,
          IndexError, AttributeError, struct.error) as exc:
    raise UserError(f"{path!r} is not a readable torch.save state dict: {_one_line(exc)}") from None
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]  # a training checkpoint that wraps the state dict
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise UserError(f"{path!r} holds a {type(obj).__name__}, not a state dict of tensors")
  return {str(k): v for k, v in obj.items()}


def _one_line(exc: BaseException) -> str:
  text = " ".join(str(exc).split()) or type(exc).__name__
  return text if len(text) <= 200 else text[:197] + "..."
