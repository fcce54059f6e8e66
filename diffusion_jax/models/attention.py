"""Scaled dot-product attention with a choice of kernel (`config.model.attention`).

    dot_product(q [B, T, H, D], k [B, S, H, D], v [B, S, H, D], key_mask [B, S] bool | None) → [B, T, H, D]

- `xla`: two einsums and a softmax lowered by XLA (`jax.nn.dot_product_attention`'s numerics); the full
  [B, H, T, S] score matrix is formed.
- `cudnn`: cuDNN's fused flash attention (GPU; float16 / bfloat16, head width a multiple of 8 up to 128).
  It takes no broadcast [B, 1, 1, S] mask: the key mask is passed as per-example key lengths, which is the
  same mask because the tokenizer pads at the end (the valid keys are a prefix). Odd sequence lengths
  are padded to even ones (see `_cudnn`). On an H200 (B 16, 4,096 tokens, 5 heads of 64, bf16) its
  forward + backward took 3.6 ms against the XLA path's 15.2 (benchmarks/attention_check.py).
- `splash`: the Pallas TPU splash-attention kernel. Sequences are padded to its 128-token blocks, the key
  mask becomes segment ids (keys of id 0 are never attended), and under a mesh it runs per device in a
  shard_map over the batch (data, fsdp) and heads (tensor) axes. Off TPU it runs interpreted (tests only).
- `auto`: per call, what the backend has and the call fits: cudnn on GPU for 16-bit inputs of a
  supported head width, splash on TPU, else xla.
All agree with `xla` to floating-point tolerance (tests/test_attention.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from diffusion_jax.errors import UserError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_SPLASH_BLOCK = 128
_MESH_BATCH_AXES, _MESH_HEADS_AXIS = ("data", "fsdp"), "tensor"


def check_available(implementation: str) -> None:
  """A UserError, before any work, for a kernel this machine's backend does not have."""
  if implementation not in IMPLEMENTATIONS:
    raise UserError(f"config.model.attention={implementation!r} is not allowed; choose one of {list(IMPLEMENTATIONS)}")
  backend = jax.default_backend()
  if implementation == "cudnn" and backend != "gpu":
    raise UserError(f"config.model.attention='cudnn' needs an NVIDIA GPU; this machine's JAX backend is "
                    f"{backend!r}: use 'auto' or 'xla'")


def _cudnn_fits(q: jax.Array) -> bool:
  head_dim = q.shape[-1]
  return q.dtype in (jnp.float16, jnp.bfloat16) and head_dim % 8 == 0 and head_dim <= 128


def resolve(implementation: str, q: jax.Array) -> str:
  """The kernel a call with queries `q` uses: `implementation` itself, or auto's choice for this backend."""
  if implementation != "auto":
    return implementation
  backend = jax.default_backend()
  if backend == "gpu" and _cudnn_fits(q):
    return "cudnn"
  if backend == "tpu":
    return "splash"
  return "xla"


def dot_product(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None,
                implementation: str = "xla") -> jax.Array:
  """softmax(q kᵀ / √D + mask) v per head; key_mask [B, S] True = attend (None: all keys)."""
  kind = resolve(implementation, q)
  if kind == "xla":
    return _xla(q, k, v, key_mask)
  if kind == "cudnn":
    return _cudnn(q, k, v, key_mask)
  if kind == "splash":
    return _splash_sharded(q, k, v, key_mask)
  raise ValueError(f"unknown attention implementation {kind!r}")


def _xla(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  """Attention as two einsums and a float32 softmax, the numerics of jax.nn.dot_product_attention's
  `xla` path. Written out because that path vmaps over query groups, after which XLA:CPU transposed
  the [B, H, T, S] probabilities in the forward and backward passes (about 7% of the traced small-preset step)."""
  # Heads moved next to the batch by explicit transposes of q, k, v ([B, T, H, D] → [B, H, T, D]), so that
  # both dots are plain batched matmuls over [B, H]. Left to the einsums, XLA:CPU picked layouts that
  # copied the [B, H, T, S] logits and probabilities in the forward and backward passes: 8.8 against
  # 13.3 ms for the forward and backward of the small preset's 256-token self-attention (B 16, H 1, D 32).
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  logits = jnp.einsum("bhtd,bhsd->bhts", heads_first(q), heads_first(k),
                      preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return heads_first(jnp.einsum("bhts,bhsd->bhtd", probs, heads_first(v)))


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  """cuDNN flash attention, the key mask given as key lengths. Odd sequence lengths are padded by one:
  jax's cuDNN path (0.10, 0.11) passes an empty bias even when there is none and then, when
  differentiated, requires even query and key lengths, so training failed on an H200 with "Unsupported
  sequence length Q 4096, KV 77" (cross-attention to a 77-token prompt) and would have for the text
  encoder's 77-token self-attention. A padded key is masked (it lies past every example's length), a
  padded query's output row is cut off."""
  t, s = q.shape[1], k.shape[1]
  lengths = None if key_mask is None else jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
  if s % 2:
    k, v = _pad_to_multiple(k, 1, 2), _pad_to_multiple(v, 1, 2)
    lengths = jnp.full((q.shape[0],), s, jnp.int32) if lengths is None else lengths
  out = jax.nn.dot_product_attention(_pad_to_multiple(q, 1, 2), k, v, key_value_seq_lengths=lengths,
                                     implementation="cudnn")
  return out[:, :t]


def _pad_to_multiple(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """`x` zero-padded at the end of `axis` to a multiple of `multiple` (itself if it is one)."""
  size = x.shape[axis]
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, -size % multiple)
  return jnp.pad(x, widths) if widths[axis][1] else x


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  """Splash attention on the arrays this device holds: [b, T, h, D] × [b, S, h, D] → [b, T, h, D]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks  # pylint: disable=g-import-not-at-top
  b, t, h, d = q.shape
  s = k.shape[1]
  if key_mask is None:
    key_mask = jnp.ones((b, s), bool)
  # [b, h, T', D], the kernel's layout; the kernel does not scale q. Padded keys get segment id 0 and are
  # never attended (all queries have id 1); padded queries are cut off below.
  q_, k_, v_ = (_pad_to_multiple(x, 1, _SPLASH_BLOCK).transpose(0, 2, 1, 3)
                for x in (q * (1.0 / math.sqrt(d)), k, v))
  kv_ids = _pad_to_multiple(key_mask.astype(jnp.int32), 1, _SPLASH_BLOCK)
  q_ids = jnp.ones((b, q_.shape[2]), jnp.int32)
  mask = masks.MultiHeadMask([masks.FullMask((q_.shape[2], k_.shape[2]))] * h)
  kernel = kernels.make_splash_mha(mask, head_shards=1, q_seq_shards=1,
                                   block_sizes=kernels.BlockSizes.get_default(),
                                   interpret=jax.default_backend() != "tpu")
  out = jax.vmap(lambda qq, kk, vv, qi, ki: kernel(qq, kk, vv, segment_ids=kernels.SegmentIds(qi, ki)))(
      q_, k_, v_, q_ids, kv_ids)
  return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)


def _splash_sharded(q, k, v, key_mask):
  """`_splash` per device under the current mesh: a Pallas kernel is not partitioned by XLA itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _splash(q, k, v, key_mask)
  batch_axes = tuple(a for a in _MESH_BATCH_AXES if a in mesh.shape)
  batch_size = math.prod(mesh.shape[a] for a in batch_axes)
  batch = batch_axes if batch_axes and q.shape[0] % batch_size == 0 else None
  heads = _MESH_HEADS_AXIS if q.shape[2] % mesh.shape.get(_MESH_HEADS_AXIS, 1) == 0 else None
  spec = P(batch, None, heads, None)
  mask = jnp.ones(k.shape[:2], bool) if key_mask is None else key_mask
  return jax.shard_map(_splash, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)),
                       out_specs=spec, check_vma=False)(q, k, v, mask)
