"""The FID Inception: parity with pytorch-fid, the torch-free weights reader, the converter, bad weights."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import convert_inception
from diffusion_jax.errors import UserError
from diffusion_jax.metrics import inception, torch_checkpoint
from tests import reference_inception

_SIZES = [(8, 8), (64, 48)]  # upsampled to 299×299; one non-square
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def torch_state_dict():
  """Seeded random weights as torch tensors (the test skips where torch or pytorch-fid is missing)."""
  return reference_inception.random_state_dict(seed=0)


@pytest.fixture(scope="module")
def state_dict(torch_state_dict):
  return {k: v.numpy() for k, v in torch_state_dict.items()}


@pytest.fixture(scope="module")
def variables(state_dict):
  return inception.torch_to_flax(state_dict)


@pytest.fixture(scope="module")
def forward(variables):
  return inception.forward_fn(variables, return_blocks=True)


def _zero_state_dict() -> dict[str, np.ndarray]:
  """A well-formed state dict (zeros) from the module's abstract variables: needs neither torch nor compute."""
  abstract = jax.eval_shape(inception.FIDInceptionV3().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  return inception.flax_to_torch(zeros)


def _flat(variables) -> dict[str, np.ndarray]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]}


def _assert_same_variables(a, b):
  flat_a, flat_b = _flat(a), _flat(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    assert flat_a[key].dtype == flat_b[key].dtype, key
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


def _one_line_error(fn, *args) -> str:
  with pytest.raises(UserError) as info:
    fn(*args)
  message = str(info.value)
  assert "\n" not in message, message
  return message


# ---- Parity with pytorch-fid ----------------------------------------------------------------------------


def test_resize_matches_torch_interpolate():
  torch, _ = reference_inception.import_reference()
  rng = np.random.default_rng(1)
  for h, w in [(8, 8), (64, 48), (320, 511), (299, 299)]:  # up, up non-square, down (no antialias), identity
    images = rng.integers(0, 256, (2, h, w, 3)).astype(np.float32)
    ours = np.asarray(inception.preprocess(images))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(images / 255).permute(0, 3, 1, 2), size=(299, 299),
                                             mode="bilinear", align_corners=False)
    theirs = (2 * theirs - 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0, err_msg=f"{h}x{w}")


@pytest.mark.parametrize("size", _SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_pytorch_fid(size, torch_state_dict, forward):
  model = reference_inception.reference_model(torch_state_dict)
  images = np.random.default_rng(size[0]).integers(0, 256, (2, *size, 3), dtype=np.uint8)
  theirs = reference_inception.reference_outputs(model, torch_state_dict, images.astype(np.float32) / 255)
  ours = jax.device_get(forward(images.astype(np.float32)))

  report = []
  names = [f"block{i}" for i in range(4)] + ["pool", "logits"]
  for name, a, b in zip(names, [*ours["blocks"], ours["pool"], ours["logits"]],
                        [*theirs["blocks"], theirs["pool"], theirs["logits"]]):
    assert a.shape == b.shape, (name, a.shape, b.shape)
    diff, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
    report.append((name, diff, diff / scale))
  print(f"\n{size}: " + ", ".join(f"{n} max|Δ|={d:.2e} ({r:.1e} of scale)" for n, d, r in report))
  # The first block fails first if the resize or normalization differs; every block must hold the bound.
  for name, diff, relative in report:
    assert relative <= 1e-4, f"{name}: max |Δ| {diff} is {relative:.2e} of the reference's scale"
  assert ours["pool"].shape == (2, inception.NUM_FEATURES) and ours["logits"].shape == (2, inception.NUM_LOGITS)
  # The features must depend on the image (random weights that wash the input out would prove little).
  assert np.abs(theirs["pool"][0] - theirs["pool"][1]).max() > 1e-2 * np.abs(theirs["pool"]).max()


# ---- Reading torch.save files, converting, the CLI ------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_read_state_dict_exact(zip_format, torch_state_dict, tmp_path):
  torch, _ = reference_inception.import_reference()
  base = torch.arange(60, dtype=torch.float64).reshape(6, 10)
  odd = {  # offsets, strides and dtypes that a plain state dict does not exercise
      "view": base[1:, ::3], "transposed": base.t(), "scalar": torch.tensor(7, dtype=torch.int64),
      "half": torch.linspace(-2, 2, 5, dtype=torch.float16), "bf16": torch.linspace(-2, 2, 5).bfloat16(),
      "mask": torch.tensor([True, False, True]), "bytes": torch.arange(4, dtype=torch.uint8),
      "int32": torch.arange(-3, 3, dtype=torch.int32)}
  tensors = {**torch_state_dict, **odd}
  path = str(tmp_path / "weights.pth")
  torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  read = torch_checkpoint.read_state_dict(path)
  assert read.keys() == tensors.keys()
  for key, tensor in tensors.items():
    expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    assert read[key].dtype == expected.dtype and read[key].shape == expected.shape, key
    np.testing.assert_array_equal(read[key], expected, err_msg=key)


def test_convert_round_trip(state_dict, variables):
  back = inception.flax_to_torch(variables)
  expected = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  assert back.keys() == expected.keys()
  for key, value in expected.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  assert _flat(variables)["params/Mixed_5b/branch1x1/conv/kernel"].shape == (1, 1, 192, 64)
  assert _flat(variables)["params/fc/kernel"].shape == (2048, 1008)
  assert _flat(variables)["batch_stats/Mixed_7c/branch_pool/bn/var"].shape == (192,)


def test_cli_converts_and_pth_loads_directly(torch_state_dict, variables, tmp_path):
  torch, _ = reference_inception.import_reference()
  pth, out = str(tmp_path / "pt_inception.pth"), str(tmp_path / "fid_inception.npz")
  torch.save(torch_state_dict, pth, _use_new_zipfile_serialization=False)  # the published file's format
  result = subprocess.run([sys.executable, "-m", "diffusion_jax.convert_inception", f"--weights={pth}",
                           f"--out={out}"], cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  count = inception.num_parameters(variables)
  assert f"{out} ({count:,} parameters)" in result.stdout
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # the atomic write left no temp file
  _assert_same_variables(inception.load_variables(out), variables)
  _assert_same_variables(inception.load_variables(pth), variables)

  # A bad input is one line on stderr and exit status 2, not a traceback.
  result = subprocess.run([sys.executable, "-m", "diffusion_jax.convert_inception", f"--weights={out}x",
                           f"--out={out}"], cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: Inception weights '{out}x' do not exist")


# ---- Bad weights (no torch needed) ----------------------------------------------------------------------


def test_missing_and_unreadable_files(tmp_path):
  missing = str(tmp_path / "nope.pth")
  message = _one_line_error(inception.load_variables, missing)
  assert f"Inception weights {missing!r} do not exist" in message, message
  assert "pt_inception-2015-12-05-6726825d.pth" in message and "--inception_weights" in message

  text = tmp_path / "notes.txt"
  text.write_text("these are not weights\n")
  message = _one_line_error(inception.load_variables, str(text))
  assert repr(str(text)) in message and "not a readable torch.save state dict" in message

  archive = tmp_path / "other.zip"
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("readme.md", "hello")
  message = _one_line_error(inception.load_variables, str(archive))
  assert "data.pkl" in message

  truncated = tmp_path / "truncated.npz"
  inception.save_variables(str(truncated), {"params": {"x": np.zeros(1000, np.float32)}})
  truncated.write_bytes(truncated.read_bytes()[:300])
  message = _one_line_error(inception.load_variables, str(truncated))
  assert repr(str(truncated)) in message


def test_wrong_shape_missing_and_unexpected_keys(tmp_path):
  good = _zero_state_dict()

  bad = dict(good, **{"Mixed_6b.branch7x7_2.conv.weight": np.zeros((128, 128, 7, 1), np.float32)})
  message = _one_line_error(inception.torch_to_flax, bad)
  assert ("'Mixed_6b.branch7x7_2.conv.weight' has shape (128, 128, 7, 1), expected (128, 128, 1, 7)"
          in message), message

  bad = {k: v for k, v in good.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
  message = _one_line_error(inception.torch_to_flax, bad)
  assert "'Mixed_7c.branch_pool.bn.running_var' (shape (192,)) is missing" in message, message

  bad = dict(good, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
  message = _one_line_error(inception.torch_to_flax, bad)
  assert "unexpected key 'AuxLogits.fc.weight' (shape (1008, 768))" in message, message

  # The same checks on a converted .npz name the path and the Flax key.
  variables = inception.torch_to_flax(good)
  variables["params"]["fc"]["kernel"] = np.zeros((2048, 1000), np.float32)
  path = str(tmp_path / "bad.npz")
  inception.save_variables(path, variables)
  message = _one_line_error(inception.load_variables, path)
  assert (repr(path) in message and "'params/fc/kernel' has shape (2048, 1000), expected (2048, 1008)"
          in message), message


class _RunsCode:
  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickle_with_other_globals_is_refused(tmp_path):
  marker = str(tmp_path / "ran")
  payload = pickle.dumps({"conv.weight": _RunsCode(marker)}, protocol=2)
  legacy = tmp_path / "evil.pth"
  legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
                     + pickle.dumps({}, protocol=2) + payload)
  in_zip = tmp_path / "evil_zip.pth"
  with zipfile.ZipFile(in_zip, "w") as z:
    z.writestr("archive/data.pkl", payload)
  for path in (legacy, in_zip):
    message = _one_line_error(torch_checkpoint.read_state_dict, str(path))
    assert "global" in message and "system" in message and "refused" in message, message
  assert not os.path.exists(marker)


def test_convert_refuses_a_directory_as_out(tmp_path):
  message = _one_line_error(convert_inception.convert, str(tmp_path / "w.pth"), str(tmp_path))
  assert "is a directory" in message
