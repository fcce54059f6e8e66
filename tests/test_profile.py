"""benchmarks/profile.py: a trace's op events joined to the compiled HLO and counted by category."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import profile


def _program():
  """A 768³ matmul (0.9 GFLOP), a 3×3 convolution, a reduction and cheap elementwise work."""
  def f(a, b, image, kernel):
    product = a @ b
    conv = jax.lax.conv_general_dilated(image, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(product).sum(axis=0), jnp.max(conv, axis=(1, 2))
  rng = np.random.default_rng(0)
  args = (rng.standard_normal((768, 768), np.float32), rng.standard_normal((768, 768), np.float32),
          rng.standard_normal((4, 16, 16, 8), np.float32), rng.standard_normal((3, 3, 8, 8), np.float32))
  args = tuple(jnp.asarray(a) for a in args)
  compiled = jax.jit(f).lower(*args).compile()
  return compiled, args


def test_hlo_ops_put_each_instruction_in_the_category_of_what_it_computes():
  compiled, _ = _program()
  ops = profile.HloOps(compiled.as_text())
  found = {}
  for name in ops._lines:  # pylint: disable=protected-access
    hit = ops.lookup(name)
    if hit:
      found.setdefault(hit[0], []).append(name)
  assert {"matmul", "convolution", "reduction"} <= set(found), found
  # The matmul's source is the JAX line that made it.
  sources = [ops.lookup(n)[1] for n in found["matmul"]]
  assert any("dot_general" in s for s in sources), sources
  assert ops.lookup("no_such_instruction") is None


def test_trace_breakdown_finds_the_matmul_dominant(tmp_path):
  compiled, args = _program()
  run_once = lambda: compiled(*args)
  jax.block_until_ready(run_once())
  out = profile.trace_and_break_down(run_once, compiled, calls=3, trace_dir=str(tmp_path / "trace"))
  categories = out["categories"]
  # Ground truth: 0.9 GFLOP of matmul against 0.6 MFLOP of convolution and a few elementwise passes.
  assert categories["matmul"]["share"] > 0.6, categories
  assert "convolution" in categories and categories["convolution"]["ms"] < categories["matmul"]["ms"]
  assert abs(sum(c["share"] for c in categories.values()) - 1.0) < 1e-6
  assert out["top_ops"][0]["category"] == "matmul"
  assert 0 < out["op_ms_per_call"] and 0 < out["wall_ms_per_call"]
  traces = [f for _, _, fs in os.walk(tmp_path / "trace") for f in fs if f.endswith("perfetto_trace.json.gz")]
  assert traces  # Opens in ui.perfetto.dev; the .xplane.pb beside it in TensorBoard.
  assert "ENTRY" in (tmp_path / "trace" / "module.hlo.txt").read_text()
  text = profile.format_breakdown("program", out)
  assert "matmul" in text.splitlines()[1]  # The costliest category first.


def test_device_events_that_name_no_instruction_are_counted_apart():
  """A GPU trace's kernels are tagged with their HLO op; a device event that names none (a library
  kernel, a copy) is summed apart instead of silently dropped, host events are not counted at all."""
  compiled, _ = _program()
  ops = profile.HloOps(compiled.as_text())
  matmul = next(n for n in ops._lines if (ops.lookup(n) or ("",))[0] == "matmul")  # pylint: disable=protected-access
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "name": "sm90_gemm_kernel", "dur": 4000.0, "args": {"hlo_op": matmul}},
      {"ph": "X", "pid": 1, "name": "cutlass_kernel_without_tag", "dur": 3000.0},
      {"ph": "X", "pid": 1, "name": "MemcpyD2D", "dur": 1000.0},
      {"ph": "X", "pid": 2, "name": "PjitFunction(step)", "dur": 9000.0},
  ]
  out = profile.break_down(events, ops, calls=2, wall_s=0.01)
  assert out["categories"]["matmul"]["ms"] == 2.0 and out["op_ms_per_call"] == 2.0
  assert out["unattributed_device_ms_per_call"] == 2.0  # (3 + 1) ms over 2 calls; the host event is not counted.
  assert out["top_unattributed"][0] == {"event": "cutlass_kernel_without_tag", "ms": 1.5}
