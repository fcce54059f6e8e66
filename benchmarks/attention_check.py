"""The attention kernels on this machine against the XLA path: numerics and speed at the SD 2.1 shapes.

  python -m benchmarks.attention_check [--batch=16] [--tokens=4096] [--heads=5] [--out=attention.json]

For each implementation this backend has (xla everywhere, cudnn on an NVIDIA GPU, splash on a TPU;
`auto`'s choice is named), two cases of the U-Net's top level (SD 2.1 at 512²: 64×64 latents = 4,096
tokens, 5 heads of width 64): self-attention, and cross-attention to 77 keys of which each example
attends to a random prefix (a padded prompt, the key mask our text conditioning passes). Inputs are
bfloat16, as in training. Each kernel's output and gradients (of a fixed random projection of the
output, w.r.t. q, k and v) are compared with the XLA path in float32 on the same bf16 inputs:
`max_rel_err` = max |kernel − reference| / max |reference|, also reported for the XLA path in bf16,
which sets the scale of what bf16 rounding alone costs. `agrees` = every error ≤ max(2 × the bf16 XLA
path's, 1e-2). The forward+backward of each kernel is timed (median of `--calls` calls).

Run where the kernels are (tests/test_attention.py checks what runs on a CPU); the results name the device.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from diffusion_jax.models import attention

CONTEXT_LENGTH, HEAD_DIM = 77, 64


def _available() -> list[str]:
  backend = jax.default_backend()
  return ["xla"] + (["cudnn"] if backend == "gpu" else []) + (["splash"] if backend == "tpu" else [])


def _inputs(batch: int, tokens: int, heads: int, keys: int, masked: bool):
  kq, kk, kv, kl, kw = jax.random.split(jax.random.PRNGKey(0), 5)
  q = jax.random.normal(kq, (batch, tokens, heads, HEAD_DIM), jnp.bfloat16)
  k = jax.random.normal(kk, (batch, keys, heads, HEAD_DIM), jnp.bfloat16)
  v = jax.random.normal(kv, (batch, keys, heads, HEAD_DIM), jnp.bfloat16)
  mask = None
  if masked:  # Each example attends to the first `length` keys, as a tokenizer that pads at the end gives.
    lengths = jax.random.randint(kl, (batch,), 1, keys + 1)
    mask = jnp.arange(keys)[None] < lengths[:, None]
  weights = jax.random.normal(kw, q.shape, jnp.float32)  # Loss = <out, weights>: all outputs get gradient.
  return q, k, v, mask, weights


def _forward_and_grads(implementation: str, dtype):
  def loss(q, k, v, mask, weights):
    out = attention.dot_product(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, implementation)
    return jnp.sum(out.astype(jnp.float32) * weights), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _max_rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check_case(batch: int, tokens: int, heads: int, keys: int, masked: bool, calls: int) -> dict:
  q, k, v, mask, weights = _inputs(batch, tokens, heads, keys, masked)
  (_, ref_out), ref_grads = _forward_and_grads("xla", jnp.float32)(q, k, v, mask, weights)
  rows = {}
  for name, implementation, dtype in [("xla_bf16", "xla", jnp.bfloat16)] + [
      (kind, kind, jnp.bfloat16) for kind in _available() if kind != "xla"]:
    fn = _forward_and_grads(implementation, dtype)
    (_, out), grads = jax.block_until_ready(fn(q, k, v, mask, weights))
    errors = {"out": _max_rel_err(out, ref_out)}
    errors.update({f"d{n}": _max_rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
    times = []
    for _ in range(calls):
      start = time.perf_counter()
      jax.block_until_ready(fn(q, k, v, mask, weights))
      times.append(time.perf_counter() - start)
    rows[name] = {"max_rel_err": errors, "fwd_bwd_ms": 1e3 * statistics.median(times)}
  bf16_scale = max(rows["xla_bf16"]["max_rel_err"].values())
  for row in rows.values():
    row["agrees"] = max(row["max_rel_err"].values()) <= max(2 * bf16_scale, 1e-2)
  return rows


def main(argv):
  del argv
  f = flags.FLAGS
  probe = jnp.zeros((1, 1, 1, HEAD_DIM), jnp.bfloat16)
  results = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "jax": jax.__version__,
             "auto_picks": attention.resolve("auto", probe), "cases": {}}
  cases = {"self": (f.tokens, False), "cross_masked": (CONTEXT_LENGTH, True)}
  for name, (keys, masked) in cases.items():
    shape = f"B {f.batch}, T {f.tokens}, S {keys}, H {f.heads}, D {HEAD_DIM}"
    print(f"{name} attention ({shape}):", flush=True)
    rows = check_case(f.batch, f.tokens, f.heads, keys, masked, f.calls)
    results["cases"][name] = {"shape": shape, **rows}
    for kind, row in rows.items():
      errors = ", ".join(f"{k} {v:.2e}" for k, v in row["max_rel_err"].items())
      print(f"  {kind:9s} fwd+bwd {row['fwd_bwd_ms']:8.2f} ms   max rel err vs f32 XLA: {errors}   "
            f"agrees: {row['agrees']}", flush=True)
  if f.out:
    with open(f.out, "w", encoding="utf-8") as file:
      json.dump(results, file, indent=2)
  if not all(row["agrees"] for case in results["cases"].values() for k, row in case.items() if k != "shape"):
    raise SystemExit("an attention kernel disagrees with the XLA path (see above)")


if __name__ == "__main__":
  flags.DEFINE_integer("batch", 16, "Batch size.", lower_bound=1)
  flags.DEFINE_integer("tokens", 4096, "Query tokens (the latent's height × width).", lower_bound=1)
  flags.DEFINE_integer("heads", 5, "Attention heads (of width 64).", lower_bound=1)
  flags.DEFINE_integer("calls", 10, "Timed calls per kernel.", lower_bound=1)
  flags.DEFINE_string("out", "", "Write the results as JSON here.")
  app.run(main)
