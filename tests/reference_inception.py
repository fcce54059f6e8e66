"""Test helper: pytorch-fid's FID InceptionV3 with seeded random weights, the reference for parity tests.

`import_reference()` imports torch and pytorch_fid.inception (skipping the test when they are missing,
failing it instead when DIFFUSION_JAX_REQUIRE_REFERENCE=1, as CI sets). `random_state_dict(seed)` and
`reference_model(state_dict)` build the network pytorch-fid runs, with those weights instead of the
downloaded ones; `reference_outputs` runs it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types

import numpy as np
import pytest

REQUIRE_ENV = "DIFFUSION_JAX_REQUIRE_REFERENCE"


def _require(module: str):
  """pytest.importorskip, except that a missing reference fails the test where CI requires it."""
  if os.environ.get(REQUIRE_ENV) == "1":
    return importlib.import_module(module)
  return pytest.importorskip(module)


def _import_torchvision_models() -> None:
  """Makes `torchvision.models.inception` importable even where torchvision's C++ ops are broken.

  A torchvision wheel built for another torch (here beside the CPU torch) fails at `import torchvision`
  with "operator torchvision::nms does not exist": its __init__ registers C++ ops. pytorch-fid only needs
  the pure-PyTorch model code in torchvision.models, so a bare package module that points at torchvision's
  directory (submodules import from there; __init__ and its ops are skipped) stands in for it. pytorch-fid
  reads __version__ to pick the keyword arguments it passes.
  """
  if sys.modules.get("torchvision") is not None:
    return  # imported, or the stub installed by an earlier call
  if importlib.util.find_spec("torchvision") is None:
    _require("torchvision")  # skips, or fails where the reference is required
  try:
    importlib.import_module("torchvision")
    return
  except Exception:  # pylint: disable=broad-except  (the RuntimeError of the broken C++ ops)
    pass
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  spec = importlib.util.find_spec("torchvision")
  stub = types.ModuleType("torchvision")
  stub.__path__ = list(spec.submodule_search_locations)
  stub.__version__ = importlib.metadata.version("torchvision")
  sys.modules["torchvision"] = stub


def import_reference():
  """(torch, pytorch_fid.inception), or the test is skipped (failed under DIFFUSION_JAX_REQUIRE_REFERENCE=1)."""
  torch = _require("torch")
  _require("pytorch_fid")
  _import_torchvision_models()
  fid_inception = _require("pytorch_fid.inception")
  return torch, fid_inception


def random_state_dict(seed: int = 0) -> dict:
  """{torchvision name: torch tensor} for the FID Inception, seeded: torch's default init for convs and fc,
  random BatchNorm affine parameters, and running statistics that are not the identity.

  The running statistics are measured on random images and then perturbed: with fixed made-up statistics
  each of the ≈50 layers shrinks the input's signal (torch's conv init alone divides it by ≈√3), so the deep
  blocks came out the same for every image and a parity test of them would say little.
  """
  torch, _ = import_reference()
  from torchvision.models import inception as tv_inception  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  # The FID blocks subclass torchvision's with the same layers: the plain Inception3 has the same state dict.
  model = tv_inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
  generator = torch.Generator().manual_seed(seed + 1)

  def uniform(t, low, high):
    return low + (high - low) * torch.rand(t.shape, generator=generator, dtype=t.dtype)

  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.momentum = None  # running statistics = the cumulative average: here, of one batch
      module.reset_running_stats()
      module.weight.data.copy_(uniform(module.weight, 0.5, 1.5))
      module.bias.data.copy_(uniform(module.bias, -0.2, 0.2))
  model.train()
  with torch.no_grad():
    model(2 * torch.rand((4, 3, 299, 299), generator=generator) - 1)
  state_dict = model.state_dict()
  for key, tensor in state_dict.items():
    if key.endswith("bn.running_mean"):
      tensor.add_(uniform(tensor, -0.1, 0.1) * tensor.abs().mean())
    elif key.endswith("bn.running_var"):
      tensor.mul_(uniform(tensor, 0.8, 1.25))
  return {k: v.clone() for k, v in state_dict.items()}


def reference_model(state_dict: dict):
  """pytorch_fid.inception.InceptionV3(blocks 0..3, resize_input, normalize_input, use_fid_inception) in eval
  mode, loaded with `state_dict` instead of the downloaded weights."""
  _, fid_inception = import_reference()
  original = fid_inception.load_state_dict_from_url
  fid_inception.load_state_dict_from_url = lambda *args, **kwargs: {k: v.clone() for k, v in state_dict.items()}
  try:
    model = fid_inception.InceptionV3([0, 1, 2, 3], resize_input=True, normalize_input=True,
                                      use_fid_inception=True)
  finally:
    fid_inception.load_state_dict_from_url = original
  return model.eval()


def reference_outputs(model, state_dict: dict, images_01: np.ndarray) -> dict:
  """images float [N, H, W, 3] in [0, 1] → {'blocks': 4 NHWC arrays, 'pool': [N, 2048], 'logits': [N, 1008]}.

  pytorch-fid's wrapper drops torchvision's fc; the logits are that fc (from `state_dict`) on the pool.
  """
  torch, _ = import_reference()
  with torch.no_grad():
    blocks = model(torch.from_numpy(np.ascontiguousarray(images_01.transpose(0, 3, 1, 2))))
    pool = torch.flatten(blocks[3], 1)
    logits = torch.nn.functional.linear(pool, state_dict["fc.weight"], state_dict["fc.bias"])
  return {"blocks": [b.permute(0, 2, 3, 1).numpy() for b in blocks], "pool": pool.numpy(),
          "logits": logits.numpy()}
