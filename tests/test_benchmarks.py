"""The benchmark suite against diffusers' Flax U-Net (benchmarks/run.py): both sides are the same network,
and the suite runs end to end at the `tiny` preset."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import peer, presets
from benchmarks import run as bench_run
from diffusion_jax.data import registry
from tests.conftest import xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NO_PEER = peer.available()
needs_peer = pytest.mark.skipif(_NO_PEER is not None, reason=str(_NO_PEER))


def _random_like(shapes, seed: int):
  """Random parameters of the given shapes: kernels at 1/√fan_in, biases and norms away from their
  initial 0 and 1, so that every parameter (and a mismatch in any) changes the output."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      values = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif name == "scale":
      values = 1 + 0.1 * rng.standard_normal(s.shape)
    else:
      values = 0.1 * rng.standard_normal(s.shape)
    return jnp.asarray(values, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@needs_peer
def test_tiny_unets_are_the_same_network():
  """Same parameter count, same convolution and matmul FLOPs, and, with the peer's parameters mapped
  onto ours by name, the same output to 1e-4 in float32."""
  preset = presets.get("tiny")
  bench = bench_run.Bench(preset, "float32")
  arch = bench_run.bench_architecture(bench, with_peer=True)
  assert arch["unet_params"] == arch["peer_unet_params"] == 792_964
  assert arch["forward_matmul_flops"] == arch["peer_forward_matmul_flops"]
  assert arch["forward_flops_equal"] and arch["unet_params_equal"]
  # The lowered totals agree up to index arithmetic (see bench_architecture): less than one elementwise
  # op on one full-resolution activation [B, S, S, C], the smallest piece of network arithmetic.
  assert abs(arch["forward_flops_diff"]) < preset.batch_size * preset.image_size**2 * preset.block_channels[0]

  peer_params = _random_like(jax.eval_shape(bench.peer_unet().init_weights, jax.random.PRNGKey(0)), seed=0)
  ours = peer.peer_params_to_ours(peer_params, len(preset.block_channels))
  expected = bench.our_unet_abstract()
  assert jax.tree.structure(ours) == jax.tree.structure(expected)
  assert jax.tree.map(lambda a: a.shape, ours) == jax.tree.map(lambda a: a.shape, expected)

  b, (s, _, c) = preset.batch_size, preset.input_shape
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  x = jax.random.normal(keys[0], (b, s, s, c))
  t = jnp.array([17, 913], jnp.int32)
  context = jax.random.normal(keys[1], (b, preset.context_length, preset.context_width))
  ours_out = jax.jit(bench.our_forward)(ours, x, t, context)
  peer_out = jax.jit(bench.peer_forward)(peer_params, jnp.transpose(x, (0, 3, 1, 2)), t, context)
  assert float(jnp.std(ours_out)) > 0.1  # A real signal, not zeros on both sides.
  np.testing.assert_allclose(np.asarray(ours_out), np.asarray(jnp.transpose(peer_out, (0, 2, 3, 1))),
                             atol=1e-4, rtol=0)


@needs_peer
def test_architecture_flops_without_lowered_cost_analysis_and_with_a_fused_attention_kernel(monkeypatch):
  """As on an H200 (jax 0.11.2), where the GPU plugin has no cost analysis of lowered programs (it
  returned None and the train suite failed) and `auto` picks cuDNN attention, one custom call whose
  matmuls a FLOP count would miss: the counts come from the traced programs, ours with XLA attention
  (splash stands in for the fused kernel on a CPU)."""
  monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
  preset = presets.get("tiny")
  bench = bench_run.Bench(preset, "float32", attention="splash")  # A Pallas kernel: one custom call.
  arch = bench_run.bench_architecture(bench, with_peer=True)
  assert arch["forward_gflop"] is None and arch["peer_forward_gflop"] is None
  assert arch["forward_matmul_flops"] == arch["peer_forward_matmul_flops"] > 0 and arch["forward_flops_equal"]
  assert arch["model_gflop"] == 3 * arch["forward_matmul_flops"] / 1e9
  x, _, t, context = bench.forward_inputs()
  hidden = bench_run.matmul_flops(bench.our_forward, bench.our_unet_abstract(), x, t, context)
  # Through the kernel the count is not the architecture's: splash's body multiplies 128-token blocks of
  # padding; a cuDNN custom call would hide its matmuls.
  assert hidden != arch["forward_matmul_flops"]


def test_presets_derive_both_sides_from_one_layout():
  preset = presets.get("sd21")
  config = presets.our_config(preset)
  un = config.model.unet
  assert (un.channels, tuple(un.channel_mult), un.num_res_blocks) == (320, (1, 2, 4, 4), 2)
  assert tuple(un.transformer_depth) == (1, 1, 1, 0) and un.head_dim == 64 and un.use_linear_projection
  assert config.model.dtype == "bfloat16" and presets.our_config(preset, "float32").model.dtype == "float32"
  kwargs = presets.peer_unet_kwargs(preset)
  assert kwargs["attention_head_dim"] == (5, 10, 20, 20)  # Heads, as diffusers reads it.
  assert kwargs["down_block_types"][-1] == "DownBlock2D" and kwargs["up_block_types"][0] == "UpBlock2D"
  assert kwargs["cross_attention_dim"] == 1024
  with pytest.raises(ValueError, match="multiples of 32"):
    presets.Preset("bad", (48, 96), (True, False), 1, 16, 8, 2, 8, 32)


@pytest.fixture(scope="module", autouse=True)
def restore_dataset_registry():
  """presets.our_config registers stand-in datasets in the process-wide registry: the test files this
  worker runs next must see only the real datasets (test_datasets checks the list that errors name)."""
  saved = dict(registry.DATASETS)
  yield
  registry.DATASETS.clear()
  registry.DATASETS.update(saved)


@pytest.fixture(scope="module", autouse=True)
def end_to_end_run(tmp_path_factory):
  """`python -m benchmarks.run` at `tiny` (train, sampler, profile, startup and compiler_options, one step
  each), started before this module's other tests so that its minutes of compiling on one core overlap
  them. XLA's LLVM optimizations are off in it (tests/conftest.py), and its expensive passes too: the test
  checks what the suite does and writes, not its numbers. The persistent compilation cache is on in a
  directory of its own."""
  if _NO_PEER is not None:
    yield None
    return
  out = tmp_path_factory.mktemp("bench") / "results.json"
  cache_dir = tmp_path_factory.mktemp("bench_compilation_cache")
  env = dict(os.environ, XLA_FLAGS=xla_flags() + " --xla_llvm_disable_expensive_passes=true")
  process = subprocess.Popen(
      [sys.executable, "-m", "benchmarks.run", "--suite=train,sampler,profile,startup,compiler_options",
       "--config=tiny", "--steps=1", "--blocks=1", "--sampler_steps=2", f"--out={out}",
       f"--compilation_cache_dir={cache_dir}", "--compiler_option_set=o1:xla_backend_optimization_level=1",
       "--compiler_option_set=unknown:xla_no_such_option=3"],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  yield process, out, cache_dir
  if process.poll() is None:
    process.kill()
    process.communicate()


@needs_peer
def test_suite_runs_end_to_end_at_tiny(end_to_end_run):
  process, out, cache_dir = end_to_end_run
  stdout, stderr = process.communicate(timeout=900)
  assert process.returncode == 0, stderr[-3000:]
  assert "[tiny] train: timing" in stderr and "[tiny] sampler: timing" in stderr  # Progress lines.
  written = json.loads(out.read_text())
  train, sampler = written["configs"]["tiny"]["train"], written["configs"]["tiny"]["sampler"]
  assert train["ratio_vs_peer"] > 0 and sampler["ratio_vs_peer"] > 0
  assert train["forward_flops_equal"] and train["unet_params_equal"]
  assert train["images_per_s"] > 0 and train["peer_images_per_s"] > 0 and train["step_gflop"] > 0
  assert 0 < train["fraction_of_matmul_peak"] and written["matmul_peak_gflop_s"]["float32"] > 0
  assert sampler["s_per_image"] > 0 and sampler["peer_compile_s"] > 0
  # On a CPU the peer is also timed compiled with our XLA options (diffusion_jax/compiler.py).
  assert train["ratio_vs_peer_our_options"] > 0 and sampler["ratio_vs_peer_our_options"] > 0
  table = stdout.splitlines()
  assert any(line.split()[:3] == ["tiny", "train", "images/s"] for line in table), stdout
  # The host: its CPU model, and the share of the run's CPU time that other guests took (in the header).
  assert written["cpu"] and 0 <= written["cpu_steal_fraction"] <= 1
  assert any(line.startswith("device:") and "CPU steal" in line for line in table), stdout
  # Both steps profiled, their traces beside results.json; a U-Net step's op time is mostly
  # convolutions and matmuls, and the shares add up.
  for side in ("ours", "peer"):
    prof = written["configs"]["tiny"]["profile"][side]
    assert prof["trace_dir"] == os.path.join(str(out)[:-5] + "_traces", "tiny", side)
    assert any(f.endswith("perfetto_trace.json.gz") for _, _, fs in os.walk(prof["trace_dir"]) for f in fs)
    shares = {c: r["share"] for c, r in prof["categories"].items()}
    assert {"convolution", "matmul"} <= set(shares) and abs(sum(shares.values()) - 1) < 1e-3, shares
  assert any(line.split()[:2] == ["tiny", "profile"] for line in table), stdout
  # startup: the step compiled in this process was the cold compile and wrote the cache; the fresh process
  # read it instead of compiling: it wrote no train step of its own. The one other train step in the cache
  # is the compiler_options suite's o1 compile (other options: another key).
  startup = written["configs"]["tiny"]["startup"]
  assert "cold_cache_compile_s" not in startup and startup["warm_cache_compile_s"] > 0, startup
  assert startup["compile_s"] == train["compile_s"] and "wrote the cache" in startup["note"]
  # State creation by phase, in this process and in the warm one (rounded to 4 digits in the JSON).
  for created, total_s in ((train["create_state_phases_s"], train["create_state_s"]),
                           (startup["warm_cache_create_state_phases_s"], startup["warm_cache_create_state_s"])):
    assert list(created) == ["trace", "draw", "compile", "place", "run"]
    assert 0.8 * total_s < sum(created.values()) <= total_s * 1.001
  assert any(line.split()[:5] == ["tiny", "startup", "of", "which", "compile"] for line in table), stdout
  assert written["compilation_cache"] == {"dir": str(cache_dir), "entries_at_start": 0}
  cached_steps = [f for f in os.listdir(cache_dir) if f.startswith("jit_train_step-")]
  assert len(cached_steps) == 2, cached_steps
  # compiler_options: the default and o1 compiled and timed side by side; an option this jaxlib lacks is
  # an error of its own set, not of the suite.
  tried = written["configs"]["tiny"]["compiler_options"]
  assert tried["o1"]["options"] == {"xla_backend_optimization_level": 1}
  assert tried["o1"]["compile_s"] > 0 and tried["o1"]["speed_vs_default"] > 0 and tried["default"]["step_s"] > 0
  assert "xla_no_such_option" in tried["unknown"]["error"] and "step_s" not in tried["unknown"]
  assert any(line.split()[:3] == ["tiny", "compiler_options", "o1"] for line in table), stdout


def test_compiler_option_sets_parse_values_by_type():
  name, options = bench_run.parse_compiler_option_set("fast:xla_gpu_autotune_level=0,xla_gpu_enable_triton_gemm=false,"
                                                      "xla_some_ratio=0.5,xla_some_dir=/tmp/x")
  assert name == "fast"
  assert options == {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False, "xla_some_ratio": 0.5,
                     "xla_some_dir": "/tmp/x"}
  assert type(options["xla_gpu_autotune_level"]) is int and options["xla_gpu_enable_triton_gemm"] is False
  for bad in ("nocolon", ":xla_a=1", "name:", "name:xla_a", "name:=1"):
    with pytest.raises(ValueError, match="NAME:OPTION=VALUE|OPTION=VALUE"):
      bench_run.parse_compiler_option_set(bad)
  assert bench_run.default_compiler_option_sets("cpu") == {}
  assert all(k.startswith("xla_gpu_") for s in bench_run.default_compiler_option_sets("gpu").values() for k in s)


def test_missing_diffusers_is_a_one_line_note(monkeypatch):
  for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")] + ["diffusers"]:
    monkeypatch.setitem(sys.modules, name, None)  # An import of any of them now fails.
  note = peer.available()
  assert note is not None and "pip install -e '.[bench]'" in note and "\n" not in note


@pytest.mark.parametrize("args, allowed", [("--config=nope", "tiny, small, medium, sd21"),
                                           ("--suite=trian", "train, sampler, startup, memory, input"),
                                           ("--compiler_option_set=nocolon", "NAME:OPTION=VALUE")])
def test_bad_flag_is_a_one_line_error(args, allowed):
  result = subprocess.run([sys.executable, "-m", "benchmarks.run", args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
  assert len(errors) == 1 and allowed in errors[0], result.stderr
