"""Attention kernels (models/attention.py) against the XLA path and a numpy reference.

The Pallas splash kernel runs interpreted on CPU: the same kernel code as on TPU, so its padding to
128-token blocks, key masking by segment ids, scaling and gradients are checked here; cuDNN needs a GPU,
so what is checked here is the mask form it is given (key lengths), through the XLA lowering.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.errors import UserError
from diffusion_jax.models import attention
from diffusion_jax.text.tokenizer import ByteTokenizer, padding_mask
from tests.conftest import xla_flags

B, T, S, H, D = 2, 16, 77, 2, 32


def _qkv(dtype=jnp.float32, t=T, s=S):
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(ks[0], (B, t, H, D), dtype), jax.random.normal(ks[1], (B, s, H, D), dtype),
          jax.random.normal(ks[2], (B, s, H, D), dtype))


_MASK = jnp.arange(S)[None] < jnp.array([5, S])[:, None]  # A 5-token prompt and a full one.


def test_xla_path_is_masked_softmax_attention():
  q, k, v = _qkv()
  got = np.asarray(attention.dot_product(q, k, v, _MASK, "xla"), np.float64)
  qn, kn, vn = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, ·, D]
  logits = qn @ kn.transpose(0, 1, 3, 2) / np.sqrt(D) + np.where(np.asarray(_MASK), 0, -np.inf)[:, None, None, :]
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  want = (weights / weights.sum(-1, keepdims=True) @ vn).transpose(0, 2, 1, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_xla_path_equals_jax_dot_product_attention(dtype, tol):
  """Our written-out XLA attention against jax.nn.dot_product_attention: outputs and gradients."""
  q, k, v = _qkv(dtype)
  mask = _MASK[:, None, None, :]
  ours = lambda q, k, v: attention.dot_product(q, k, v, _MASK, "xla")
  jaxs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  as_f32 = lambda tree: [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]
  np.testing.assert_allclose(*as_f32((ours(q, k, v), jaxs(q, k, v))), rtol=tol, atol=tol)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v).astype(jnp.float32)))
  for got, want in zip(as_f32(jax.grad(loss(ours), (0, 1, 2))(q, k, v)), as_f32(jax.grad(loss(jaxs), (0, 1, 2))(q, k, v))):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("masked, t, s", [(False, T, T), (True, T, S), (True, 130, S)])
def test_splash_equals_xla_forward_and_gradients(masked, t, s):
  """Self-attention (16 tokens, padded to a block), cross-attention to 77 keys with a padded prompt, and
  more queries than one block (130)."""
  q, k, v = _qkv(t=t, s=s)
  mask = _MASK if masked else None
  loss = lambda impl: lambda q, k, v: jnp.sum(attention.dot_product(q, k, v, mask, impl) ** 2)
  np.testing.assert_allclose(attention.dot_product(q, k, v, mask, "splash"),
                             attention.dot_product(q, k, v, mask, "xla"), rtol=1e-5, atol=1e-5)
  for g_splash, g_xla in zip(jax.grad(loss("splash"), (0, 1, 2))(q, k, v), jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_splash, g_xla, rtol=1e-4, atol=1e-4)
  if masked:  # Masked keys get no gradient at all.
    assert float(jnp.abs(jax.grad(loss("splash"), 1)(q, k, v)[0, 5:]).max()) == 0.0


def test_splash_in_bfloat16_is_within_bfloat16_tolerance():
  q, k, v = _qkv(jnp.bfloat16)
  got = attention.dot_product(q, k, v, _MASK, "splash").astype(jnp.float32)
  want = attention.dot_product(*(x.astype(jnp.float32) for x in (q, k, v)), _MASK, "xla")
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


def test_key_lengths_are_the_tokenizers_padding_mask():
  """cuDNN takes key lengths, not a mask: equal because the tokenizer pads at the end (prefix masks)."""
  tokens = ByteTokenizer(S).encode_batch(["a handwritten digit 7", ""])
  mask = jnp.asarray(padding_mask(tokens))
  lengths = mask.sum(-1)
  assert bool(jnp.all(mask == (jnp.arange(S)[None] < lengths[:, None])))  # A prefix in every row.
  q, k, v = _qkv()
  by_lengths = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="xla")
  np.testing.assert_allclose(by_lengths, attention.dot_product(q, k, v, mask, "xla"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t, s, masked", [(16, 77, True), (77, 77, True), (15, 16, False), (16, 16, False)])
def test_cudnn_call_passes_jaxs_flash_attention_check_and_equals_xla(monkeypatch, t, s, masked):
  """jax's cuDNN path, when differentiated, requires even sequence lengths (it counts its empty bias as a
  bias): on an H200 the U-Net's cross-attention to 77 tokens failed with "Unsupported sequence length Q
  4096, KV 77". Here each cuDNN call goes through jax's own check (it runs on a CPU) and is then computed
  by jax's XLA implementation with the same arguments: the padding and key lengths give the same outputs
  and gradients as our XLA path (cross-attention, the text encoder's 77-token self-attention, odd queries)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_lib  # pylint: disable=g-import-not-at-top
  check = lambda q, k, v: cudnn_lib.check_is_flash_attention(q, k, v, cudnn_lib.AttentionLayout.BTNH.value,
                                                              91000, has_bias=True, is_training=True)
  original, calls = jax.nn.dot_product_attention, []

  def cudnn_stand_in(q, k, v, *, implementation, **kwargs):
    assert implementation == "cudnn"
    check(q, k, v)
    calls.append((q.shape[1], k.shape[1], kwargs["key_value_seq_lengths"] is not None))
    return original(q, k, v, implementation="xla", **kwargs)

  q, k, v = _qkv(t=t, s=s)
  if t % 2 or s % 2:  # The shapes as given fail the check: the error seen on the GPU.
    with pytest.raises(NotImplementedError, match=f"Unsupported sequence length Q {t}, KV {s}"):
      check(q, k, v)
  monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_stand_in)
  mask = jnp.arange(s)[None] < jnp.array([5, s])[:, None] if masked else None
  loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product(q, k, v, mask, impl)))
  np.testing.assert_allclose(attention.dot_product(q, k, v, mask, "cudnn"),
                             attention.dot_product(q, k, v, mask, "xla"), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(loss("cudnn"), (0, 1, 2))(q, k, v), jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert calls[0] == (t + t % 2, s + s % 2, masked or s % 2 == 1)  # Even lengths; no lengths when not needed.


def test_auto_never_picks_a_kernel_the_backend_lacks(monkeypatch):
  q16, q32 = jnp.zeros((1, 4, 2, 64), jnp.bfloat16), jnp.zeros((1, 4, 2, 64), jnp.float32)
  assert jax.default_backend() == "cpu"
  assert attention.resolve("auto", q16) == attention.resolve("auto", q32) == "xla"
  with pytest.raises(UserError, match="config.model.attention='cudnn' needs an NVIDIA GPU; this machine's JAX "
                                      "backend is 'cpu'"):
    attention.check_available("cudnn")
  attention.check_available("splash")  # Runs interpreted off TPU (tests).
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention.resolve("auto", q16) == "cudnn"
  assert attention.resolve("auto", q32) == "xla"  # cuDNN flash attention is 16-bit only.
  assert attention.resolve("auto", jnp.zeros((1, 4, 2, 160), jnp.bfloat16)) == "xla"  # Head width > 128 (SD 1.5).
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention.resolve("auto", q32) == "splash"


_SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from configs import smoke
from diffusion_jax import build
from diffusion_jax.parallel import mesh as mesh_lib
from tests.conftest import perturbed
outs, params = {}, None
for impl in ("xla", "splash"):
  config = smoke.get_config()
  config.model.attention = impl
  config.mesh.shape, config.mesh.replicate_indivisible = (2, 2, 2), True
  run = build.build(config)
  if params is None:  # One set of parameters for both (the kernel has none).
    state, _ = run.create_state(jax.random.PRNGKey(0))
    # Non-zero output projections, so that attention reaches the output.
    params = perturbed(state.params)
  x, t, inputs = run.model.dummy_inputs(8)
  x = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  inputs = {k: jnp.asarray(v) for k, v in run.conditioning.inputs_for(["a handwritten digit 7"] * 8).items()}
  with mesh_lib.activate(run.mesh, run.rules):
    outs[impl] = np.asarray(jax.jit(lambda p: run.model.apply({"params": p}, x, t + 500, inputs))(params))
np.testing.assert_allclose(outs["splash"], outs["xla"], rtol=1e-4, atol=1e-4)
print("OK", float(np.abs(outs["xla"]).mean()))
"""


def test_splash_model_output_equals_xla_on_a_2x2x2_mesh():
  """The whole text model (text-encoder self-attention, U-Net self- and cross-attention) with splash in a
  shard_map over (data, fsdp) × tensor on 8 simulated devices."""
  from tests.test_cli import REPO  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
  proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
