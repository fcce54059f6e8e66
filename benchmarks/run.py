"""Benchmarks against the peer (diffusers' Flax Stable Diffusion U-Net), on the same U-Net layout.

  python -m benchmarks.run [--suite=train,sampler,startup,memory,input,profile,compiler_options | all]
                           [--config=small,medium] [--out=results.json] [--steps=5] [--blocks=3]
                           [--sampler_steps=50] [--dtype=bfloat16] [--attention=auto|xla|cudnn|splash]
                           [--trace_dir=DIR] [--compilation_cache_dir=DIR] [--compiler_option_set=NAME:OPT=VAL,...]

Suites run in the order given; one that fails is recorded (`error` in its entry) and the others still
run (the exit status is then 1). With --out the JSON is rewritten after every suite, so a run stopped
early (a lease's time limit: benchmarks/accelerator_run.sh) keeps what finished.

Per preset (benchmarks/presets.py: tiny, small, medium, sd21):
- train: our production train step (build.build → run.create_state → train_step.make_train_step, text
  encoder and EMA included) vs diffusers' train_text_to_image_flax.py step on precomputed latents and
  context: images/s, ratio_vs_peer (ours / peer), compile s, both U-Nets' parameter counts and forward
  FLOPs (the traced programs' convolution and matmul FLOPs, which must agree: same architecture; and
  XLA's totals of the lowered programs where the backend has them), model GFLOP per step (3 × the
  forward's convolution and matmul FLOPs) and the achieved model GFLOP/s and its fraction of a matmul
  peak measured in this run in the compute dtype (the same work for both sides, whatever kernels each
  uses), XLA's count of each compiled step, compiled peak memory. The peer is compiled as diffusers compiles it (plain
  jax.jit); where our programs get XLA options (diffusion_jax/compiler.py: on a CPU), the peer compiled
  with the same options is timed in the same blocks as well: ratio_vs_peer_our_options.
- sampler: our scan sampler (generation.make_sample_fn, DDIM, guidance 7.5) vs the fori_loop of
  FlaxStableDiffusionPipeline._generate, 4 prompts: s/call, s/image, compile s, ratio_vs_peer (and
  ratio_vs_peer_our_options, as for train).
- startup: creating our sharded train state and compiling our step in a fresh process with JAX's
  persistent compilation cache cold and then warm (and the train suite's in-process times, if it ran
  before in this process; the step is not compiled here only for them). With --compilation_cache_dir
  and the step compiled before in this process, that compile is the cold one and only the warm process runs.
- memory: our step's compiled peak memory (arguments + outputs + temporaries − donated aliases) and
  step time for remat policies none / full / dots.
- input: the input pipeline's examples/s (digits, at the preset's batch size) over the images/s our
  train step consumes (input_headroom; > 1: the pipeline keeps up).
- profile: a jax.profiler trace of `steps` train steps of each side (TensorBoard or ui.perfetto.dev) and
  where the time goes: ms per step and share of the op time by category (convolution, matmul, attention
  kernel, reduction, transpose/copy, select, elementwise, collective) and the costliest ops
  (benchmarks/profile.py); the results hold the trace directory.
- compiler_options: our step compiled with other XLA options (--compiler_option_set; on a GPU by
  default no Triton GEMMs and autotuning levels 0 and 1), cold in a fresh process when
  --compilation_cache_dir is given, and each timed side by side with the default compile: XLA compile s
  and step s, and their ratios to the default's. How an option is chosen for compiler.options().

Timings are taken side by side: blocks of `steps` calls alternate between ours and the peer and the
median block is reported (the JSON has every block), so a noisy shared machine slows both alike. In this
process JAX's persistent compilation cache is off, so compile times are cold (the startup suite measures
the cache separately), unless --compilation_cache_dir turns it on. Neither side runs a VAE or a frozen
CLIP: inputs are S×S×4 latents. The results name the CPU model and the share of the run's CPU time the
hypervisor gave other guests (`cpu`, `cpu_steal_fraction`: benchmarks/host.py), by which absolute
numbers from a shared machine can be judged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import host
from benchmarks import peer as peer_lib
from benchmarks import presets
from benchmarks import profile as profile_lib
from diffusion_jax import build, compiler, generation, memory_fit, paths, train_state
from diffusion_jax import train_step as train_step_lib
from diffusion_jax.config import COMPUTE_DTYPES
from diffusion_jax.models import attention as attention_lib
from diffusion_jax.models.diffusion_model import DiffusionModel
from diffusion_jax.parallel import mesh as mesh_lib

SUITES = ("train", "sampler", "startup", "memory", "input", "profile", "compiler_options")
REMAT_POLICIES = ("none", "full", "dots")
SAMPLER_PROMPTS = 4
GUIDANCE_SCALE = 7.5
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# JAX's persistent cache also turns on XLA's own caches in its directory (on a GPU, per-fusion autotuning
# results): off here, so that a compile in a fresh process with other options is still cold.
_NO_XLA_CACHES = "none"
_START = time.perf_counter()


def _log(message: str) -> None:
  print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def _cost_flops(stage) -> float | None:
  """XLA's FLOP count of a Lowered or Compiled program; None where the backend has none (a GPU's PJRT
  plugin analyses compiled programs only)."""
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def _memory_mib(compiled) -> dict[str, float | None]:
  """'peak_mib': arguments + outputs + temporaries − donated (aliased) buffers, what the step needs
  resident (memory_fit.Footprint.peak, as a training job checks it); 'temp_mib': the temporaries alone."""
  footprint = memory_fit.Footprint.of(compiled)
  if footprint is None:
    return {"peak_mib": None, "temp_mib": None}
  return {"peak_mib": round(footprint.peak / 2**20, 2), "temp_mib": round(footprint.temporaries / 2**20, 2)}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def interleaved_seconds(runners: dict[str, Callable[[], Any]], blocks: int, calls: int) -> dict[str, list[float]]:
  """Each runner's mean seconds per call in each of `blocks` blocks of `calls` calls, the runners alternating
  block by block (their order reversed every other block, so neither always runs right after the other)."""
  names = list(runners)
  times: dict[str, list[float]] = {name: [] for name in names}
  for block in range(blocks):
    for name in (names if block % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      for _ in range(calls):
        out = runners[name]()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / calls)
  return times


def matmul_flops(fn: Callable, *args) -> int:
  """FLOPs of the convolutions and matmuls (dot_general) of fn(*args), from its traced program: 2 per
  multiply-add at the nominal kernel size (XLA's cost analysis leaves out the taps that fall on padding).
  Independent of how each side writes its elementwise and index arithmetic."""
  def count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in lhs_contract]))
      elif eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape  # Its in-feature dimension is already in / feature_group_count.
        out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod(rhs)) // out_features
      for param in eqn.params.values():  # Nested programs (jit, custom_jvp, remat); U-Nets have no loops.
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            total += count(inner)
    return total

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def matmul_peak_flops(dtype: str) -> float:
  """The best FLOP/s of a few square matmuls in `dtype` on the first device (the attainable peak)."""
  sizes = (512, 1024, 2048) if jax.default_backend() == "cpu" else (2048, 4096, 8192)
  best = 0.0
  for n in sizes:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x).lower(a).compile()
    jax.block_until_ready(f(a))
    seconds = min(_timed(lambda: f(a))[1] for _ in range(5))
    best = max(best, 2 * n**3 / seconds)
  return best


class StepCompile(NamedTuple):
  compiled: Any
  compile_s: float  # Tracing, lowering and XLA's compile.
  lower_s: float  # Tracing and lowering alone.
  lowered: Any


@dataclasses.dataclass
class CompiledStep:
  """A compiled train step bound to its state and batch: run_once() runs one step, updating the state
  in place of the donated one (and returns what to block on); info: compile time, FLOPs, memory. `lowered`
  (ours) is the program before compiling, which the compiler_options suite compiles again with other options."""
  compiled: Any
  holder: dict  # {"state": the current train state}
  batch: Any
  info: dict
  lowered: Any = None

  def run_once(self, compiled: Any = None) -> Any:
    """One step of `compiled` (default: this step's program; another compile of `lowered` also fits)."""
    self.holder["state"], out = (compiled or self.compiled)(self.holder["state"], self.batch)
    return out

  def state(self) -> Any:
    return self.holder["state"]


class Bench:
  """One preset's pieces, built on first use and shared by the suites."""

  def __init__(self, preset: presets.Preset, dtype: str | None, attention: str = "auto"):
    self.preset, self.dtype, self.attention = preset, dtype or preset.dtype, attention
    self.config = presets.our_config(preset, self.dtype, attention)
    self.run = build.build(self.config, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
    self.trained_params = None
    self._peer_unet = None
    self._peer_params = None
    self._steps: dict[str, CompiledStep] = {}
    self._xla_attention_model = None

  # Ours.
  def batch(self) -> dict[str, jax.Array]:
    """A global batch: random uint8 images [B, S, S, 4] and tokenized short captions."""
    b = self.preset.batch_size
    rng = np.random.default_rng(0)
    local = {"image": rng.integers(0, 256, (b,) + self.preset.input_shape, dtype=np.uint8),
             **self.run.conditioning.inputs_for([str(i) for i in range(b)])}
    return train_step_lib.global_batch(local, self.run.mesh, ("image",) + tuple(self.run.conditioning.input_keys))

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    shapes = {"image": jax.ShapeDtypeStruct((self.preset.batch_size,) + self.preset.input_shape, jnp.uint8)}
    tokens = self.run.conditioning.inputs_for([""] * self.preset.batch_size)
    shapes.update({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in tokens.items()})
    sharding = mesh_lib.batch_sharding(self.run.mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in shapes.items()}

  def lower_step(self, run, state, batch):
    """The train step of `run` lowered for `state`/`batch` (either may be abstract), as train.py traces it."""
    shardings = jax.tree.map(lambda a: a.sharding, state)
    step = train_step_lib.make_train_step(run, shardings)
    with mesh_lib.activate(run.mesh, run.rules):
      return step.lower(state, batch)

  def compile_step(self, run, state, batch) -> "StepCompile":
    """Our train step of `run` traced, lowered and compiled for `state`/`batch` (either may be abstract);
    compile_s includes the lowering, as a job's first step pays both."""
    start = time.perf_counter()
    lowered = self.lower_step(run, state, batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    return StepCompile(compiled, time.perf_counter() - start, lower_s, lowered)

  def our_unet_abstract(self) -> Any:
    model = self.run.model
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), *model.dummy_inputs())["params"]))
    return params["unet"]

  def our_forward(self, unet_params, x, t, context, model=None):
    """Our U-Net alone: x [B, S, S, 4], t [B], context [B, L, D] (no key mask, as the peer) → [B, S, S, 4]."""
    return (model or self.run.model).apply({"params": {"unet": unet_params}}, x, t, {"context": context},
                                           method=DiffusionModel.denoise)

  def our_forward_xla_attention(self, unet_params, x, t, context):
    """`our_forward` with attention='xla', for counting FLOPs: a fused kernel (cuDNN, splash) is one
    custom call whose matmuls neither the traced program nor XLA's cost analysis sees."""
    if self._xla_attention_model is None:
      config = self.config.copy_and_resolve_references()
      config.model.attention = "xla"
      self._xla_attention_model = build.create_model(config)
    return self.our_forward(unet_params, x, t, context, self._xla_attention_model)

  def our_params(self) -> Any:
    """Our model's parameters: the train suite's latest, else freshly initialized."""
    if self.trained_params is None:
      model = self.run.model
      self.trained_params = jax.jit(lambda r: nn.unbox(model.init(r, *model.dummy_inputs())["params"]))(
          jax.random.PRNGKey(0))
    return self.trained_params

  def our_train_step(self, build: bool = True) -> "CompiledStep | None":
    """Our production train step on a fresh state, compiled (once per preset: the suites share it); info:
    create_state_s, compile_s, step_gflop, peak_mib. With build=False: None unless already built."""
    if "ours" in self._steps or not build:
      return self._steps.get("ours")
    p = self.preset
    _log(f"[{p.name}] train: creating our train state")
    phases = {}
    (state, _), create_s = _timed(lambda: self.run.create_state(jax.random.PRNGKey(0), phases))
    _log(f"[{p.name}] train: compiling ours")
    # From the abstract state and batch, as a resumed job compiles (and the startup suite's fresh process):
    # the same program, so the persistent cache entry this compile writes is the one that process reads.
    made = self.compile_step(self.run, self.run.abstract_state(), self.abstract_batch())
    self._steps["ours"] = CompiledStep(made.compiled, {"state": state}, self.batch(), {
        "create_state_s": create_s, "create_state_phases_s": phases, "compile_s": made.compile_s,
        "lower_s": made.lower_s, "step_gflop": _gflop(_cost_flops(made.compiled)),
        "peak_mib": _memory_mib(made.compiled)["peak_mib"]}, made.lowered)
    return self._steps["ours"]

  # The peer.
  def peer_unet(self):
    if self._peer_unet is None:
      self._peer_unet = peer_lib.make_peer_unet(self.preset, self.dtype)
    return self._peer_unet

  def peer_params(self) -> Any:
    """float32 parameters, initialized once per preset; callers that donate them get a copy."""
    if self._peer_params is None:
      self._peer_params = peer_lib.init_peer_params(self.peer_unet(), seed=0)
    return jax.tree.map(jnp.copy, self._peer_params)

  def peer_train_step(self, our_compiler_options: bool = False) -> "CompiledStep":
    """diffusers' train_text_to_image_flax.py step on random latents and context, compiled (once per
    preset) as diffusers compiles it, or with the XLA options our programs get (`compiler.options()`);
    info: compile_s, step_gflop, peak_mib."""
    key = "peer_our_options" if our_compiler_options else "peer"
    if key in self._steps:
      return self._steps[key]
    p = self.preset
    options = compiler.options() if our_compiler_options else {}
    _log(f"[{p.name}] train: compiling the peer" + (f" with {options}" if options else ""))
    init, step = peer_lib.make_peer_train_step(self.peer_unet())
    state = init(self.peer_params())
    rng = np.random.default_rng(1)
    s, c = p.image_size, presets.LATENT_CHANNELS
    batch = {"latents": jnp.asarray(rng.standard_normal((p.batch_size, c, s, s), np.float32)),
             "context": jnp.asarray(rng.standard_normal((p.batch_size, p.context_length, p.context_width),
                                                        np.float32)),
             "rng": jax.random.PRNGKey(2)}
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile(compiler_options=options or None)
    compile_s = time.perf_counter() - start
    self._steps[key] = CompiledStep(compiled, {"state": state}, batch, {
        "compile_s": compile_s, "step_gflop": _gflop(_cost_flops(compiled)),
        "peak_mib": _memory_mib(compiled)["peak_mib"]})
    return self._steps[key]

  def peer_forward(self, params, x_nchw, t, context):
    return self.peer_unet().apply({"params": params}, x_nchw, t, context).sample

  def forward_inputs(self):
    """Abstract forward inputs at the training batch: (x NHWC, x NCHW, t, context)."""
    b, (s, _, c) = self.preset.batch_size, self.preset.input_shape
    f32 = jnp.float32
    return (jax.ShapeDtypeStruct((b, s, s, c), f32), jax.ShapeDtypeStruct((b, c, s, s), f32),
            jax.ShapeDtypeStruct((b,), jnp.int32),
            jax.ShapeDtypeStruct((b, self.preset.context_length, self.preset.context_width), f32))


def _runs_here(preset: presets.Preset) -> bool:
  return not (preset.gpu_only and jax.default_backend() == "cpu")


def bench_architecture(bench: Bench, with_peer: bool) -> dict:
  """Parameter counts and forward FLOPs of both U-Nets (abstract: nothing is allocated). The convolution
  and matmul FLOPs are counted in the traced programs (any backend; ours with XLA attention, as the
  peer's); XLA's totals of the lowered programs where the backend analyses them (not a GPU's plugin).
  model_gflop, 3 × the forward's convolution and matmul FLOPs (forward + backward), is the work the
  fraction of the matmul peak is computed from, the same for both sides."""
  x, x_nchw, t, context = bench.forward_inputs()
  ours_params = bench.our_unet_abstract()
  forward = bench.our_forward_xla_attention
  out = {"unet_params": train_state.param_count(ours_params),
         "forward_gflop": _gflop(_cost_flops(jax.jit(forward).lower(ours_params, x, t, context))),
         "forward_matmul_flops": matmul_flops(forward, ours_params, x, t, context)}
  out["model_gflop"] = 3 * out["forward_matmul_flops"] / 1e9
  if with_peer:
    peer_params = jax.eval_shape(bench.peer_unet().init_weights, jax.random.PRNGKey(0))
    out["peer_unet_params"] = train_state.param_count(peer_params)
    out["peer_forward_gflop"] = _gflop(_cost_flops(jax.jit(bench.peer_forward).lower(peer_params, x_nchw, t,
                                                                                       context)))
    out["peer_forward_matmul_flops"] = matmul_flops(bench.peer_forward, peer_params, x_nchw, t, context)
    out["unet_params_equal"] = out["unet_params"] == out["peer_unet_params"]
    # The lowered totals differ by ~100 FLOPs per 10^8 of index and constant arithmetic that is not the
    # network's (the timestep embedding's frequency table, nearest-neighbour upsampling's source indices);
    # the convolutions and matmuls are the architecture and must agree exactly.
    out["forward_flops_equal"] = out["forward_matmul_flops"] == out["peer_forward_matmul_flops"]
    if out["forward_gflop"] is not None and out["peer_forward_gflop"] is not None:
      out["forward_flops_diff"] = round((out["forward_gflop"] - out["peer_forward_gflop"]) * 1e9)
  return out


def bench_train(bench: Bench, steps: int, blocks: int, peak: float, with_peer: bool) -> dict:
  p = bench.preset
  out = bench_architecture(bench, with_peer)
  if not _runs_here(p):
    out["note"] = f"{p.name} runs on an accelerator only: parameters and FLOPs here, no timings on CPU"
    return out
  ours = bench.our_train_step()
  out.update(ours.info)
  runners = {"ours": ours.run_once}
  if with_peer:
    peer = bench.peer_train_step()
    out.update({f"peer_{k}": v for k, v in peer.info.items()})
    runners["peer"] = peer.run_once
    if compiler.options():  # The peer once more, compiled as ours is: how much of the ratio is the options.
      same = bench.peer_train_step(our_compiler_options=True)
      out.update({f"peer_our_options_{k}": v for k, v in same.info.items()})
      runners["peer_our_options"] = same.run_once
  for run_once in runners.values():  # Warm-up: first calls allocate.
    jax.block_until_ready(run_once())
  _log(f"[{p.name}] train: timing {blocks} blocks of {steps} steps per side")
  seconds = interleaved_seconds(runners, blocks, steps)
  bench.trained_params = ours.state().params  # The sampler suite reuses them (saves an init compile).
  for side, prefix in (("ours", ""), ("peer", "peer_"), ("peer_our_options", "peer_our_options_")):
    if side not in seconds:
      continue
    out[f"{prefix}step_s_per_block"] = seconds[side]
    step_s = out[f"{prefix}step_s"] = statistics.median(seconds[side])
    out[f"{prefix}images_per_s"] = p.batch_size / step_s
    achieved = out["model_gflop"] * 1e9 / step_s
    out[f"{prefix}achieved_gflop_s"] = achieved / 1e9
    out[f"{prefix}fraction_of_matmul_peak"] = achieved / peak
  if with_peer:
    out["ratio_vs_peer"] = out["images_per_s"] / out["peer_images_per_s"]
  if "peer_our_options_images_per_s" in out:
    out["ratio_vs_peer_our_options"] = out["images_per_s"] / out["peer_our_options_images_per_s"]
  return out


def bench_profile(bench: Bench, steps: int, trace_dir: str, with_peer: bool) -> dict:
  """A jax.profiler trace of `steps` train steps of ours (and of the peer's) and where their time goes
  (benchmarks/profile.py): ms per call by op category and the costliest ops."""
  p = bench.preset
  if not _runs_here(p):
    return {"note": f"{p.name} runs on an accelerator only: no profile on CPU"}
  out = {}
  sides = [("ours", bench.our_train_step)] + ([("peer", bench.peer_train_step)] if with_peer else [])
  for side, make in sides:
    step = make()
    jax.block_until_ready(step.run_once())
    _log(f"[{p.name}] profile: tracing {steps} steps of {side}")
    out[side] = profile_lib.trace_and_break_down(step.run_once, step.compiled, calls=steps,
                                                 trace_dir=os.path.join(trace_dir, p.name, side))
    print(profile_lib.format_breakdown(f"[{p.name}] {side}", out[side]), flush=True)
  return out


def bench_sampler(bench: Bench, num_steps: int, blocks: int, with_peer: bool) -> dict:
  p = bench.preset
  out = {"num_steps": num_steps, "prompts": SAMPLER_PROMPTS, "guidance_scale": GUIDANCE_SCALE}
  if not _runs_here(p):
    out["note"] = f"{p.name} runs on an accelerator only: no sampler timings on CPU"
    return out
  run, n = bench.run, SAMPLER_PROMPTS
  # DDIM as the peer's scheduler does it for SD: "leading" timesteps, no x̂0 clipping.
  options = generation.sampler_options(bench.config, sampler="ddim", num_steps=num_steps, spacing="leading",
                                       eta=0.0, x0_clipping="none")
  _log(f"[{p.name}] sampler: compiling ours ({num_steps} DDIM steps, {n} prompts)")
  params = bench.our_params()
  inputs = jax.tree.map(jnp.asarray, run.conditioning.inputs_for([str(i) for i in range(n)]))
  null = jax.tree.map(jnp.asarray, run.conditioning.null_inputs(n))
  scales, rng = jnp.full((n,), GUIDANCE_SCALE, jnp.float32), jax.random.PRNGKey(0)
  sample_fn = generation.make_sample_fn(run.model, run.schedule, options, run.autoencoder)
  start = time.perf_counter()
  ours = sample_fn.lower(params, inputs, null, scales, rng).compile()
  out["compile_s"] = time.perf_counter() - start
  runners = {"ours": lambda: ours(params, inputs, null, scales, rng)}
  if with_peer:
    _log(f"[{p.name}] sampler: compiling the peer")
    peer_fn, scheduler_state = peer_lib.make_peer_sample_fn(bench.peer_unet(), num_steps)
    peer_params = bench.peer_params()
    key = np.random.default_rng(3)
    shape = (n, p.context_length, p.context_width)
    cond = jnp.asarray(key.standard_normal(shape, np.float32))
    uncond = jnp.asarray(key.standard_normal(shape, np.float32))
    scale = jnp.float32(GUIDANCE_SCALE)
    lowered = peer_fn.lower(peer_params, scheduler_state, cond, uncond, scale, rng)
    start = time.perf_counter()
    peer = lowered.compile()
    out["peer_compile_s"] = time.perf_counter() - start
    runners["peer"] = lambda: peer(peer_params, scheduler_state, cond, uncond, scale, rng)
    if compiler.options():  # The peer compiled as ours is, as in the train suite.
      peer_same = lowered.compile(compiler_options=compiler.options())
      runners["peer_our_options"] = lambda: peer_same(peer_params, scheduler_state, cond, uncond, scale, rng)
  for run_once in runners.values():
    jax.block_until_ready(run_once())
  _log(f"[{p.name}] sampler: timing {blocks} calls per side")
  seconds = interleaved_seconds(runners, blocks, 1)
  for side, prefix in (("ours", ""), ("peer", "peer_"), ("peer_our_options", "peer_our_options_")):
    if side in seconds:
      out[f"{prefix}s_per_call_per_block"] = seconds[side]
      out[f"{prefix}s_per_call"] = statistics.median(seconds[side])
      out[f"{prefix}s_per_image"] = out[f"{prefix}s_per_call"] / n
  if with_peer:
    out["ratio_vs_peer"] = out["peer_s_per_call"] / out["s_per_call"]
  if "peer_our_options_s_per_call" in out:
    out["ratio_vs_peer_our_options"] = out["peer_our_options_s_per_call"] / out["s_per_call"]
  return out


_CHILD = """
import json, sys, time
start = time.perf_counter()
from benchmarks import run
print(json.dumps(run.compile_in_this_process({name!r}, {dtype!r}, {attention!r}, start, {options!r}, {create_state!r})))
"""


def compile_in_this_process(name: str, dtype: str, attention: str, process_start: float,
                            options: dict[str, Any] | None = None, create_state: bool = True) -> dict:
  """Builds the preset's run, creates its sharded train state (unless not `create_state`) and compiles its
  train step from the abstract state, as a resumed job does, with `options` over compiler.options(); the
  child process of the startup and compiler_options suites. Seconds: create_state_s, compile_s (tracing,
  lowering and compiling), xla_compile_s (compiling alone), process_s (since `process_start`)."""
  bench = Bench(presets.get(name), dtype, attention)
  out = {}
  if create_state:
    out["create_state_phases_s"] = {}
    state, out["create_state_s"] = _timed(
        lambda: bench.run.create_state(jax.random.PRNGKey(0), out["create_state_phases_s"])[0])
    del state
  start = time.perf_counter()
  lowered = bench.lower_step(bench.run, bench.run.abstract_state(), bench.abstract_batch())
  lowered_at = time.perf_counter()
  lowered.compile(compiler_options=options or None)
  out.update(compile_s=time.perf_counter() - start, xla_compile_s=time.perf_counter() - lowered_at,
             process_s=time.perf_counter() - process_start)
  return out


def _cache_env(directory: str) -> dict[str, str]:
  """The environment of a child process that uses JAX's persistent compilation cache in `directory` as
  this process does under _compilation_cache (the same settings: they are part of the cache keys)."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=directory, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", XLA_PYTHON_CLIENT_PREALLOCATE="false",
              JAX_ENABLE_COMPILATION_CACHE="true", JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=_NO_XLA_CACHES)


def _compile_in_child(bench: Bench, directory: str, options: dict[str, Any] | None = None,
                      create_state: bool = True) -> dict:
  """compile_in_this_process in a fresh Python process with the persistent cache in `directory`; its
  results, or {"error": the last line it wrote to stderr}."""
  code = _CHILD.format(name=bench.preset.name, dtype=bench.dtype, attention=bench.attention, options=options,
                       create_state=create_state)
  result = subprocess.run([sys.executable, "-c", code], env=_cache_env(directory), cwd=_REPO_ROOT,
                          capture_output=True, text=True, check=False)
  if result.returncode:
    return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
  return json.loads(result.stdout.strip().splitlines()[-1])


def bench_startup(bench: Bench, cache_dir: str = "") -> dict:
  """Our sharded train state created and our step compiled in fresh processes, JAX's persistent compilation
  cache cold and then warm. With `cache_dir` (the run's own cache: --compilation_cache_dir) and the step
  already compiled in this process, that compile was the cold one and wrote the cache: only the warm
  process runs, reading it (a cold process would compile the same program again, minutes at sd21)."""
  p = bench.preset
  out = {}
  if not _runs_here(p):
    out["note"] = f"{p.name} runs on an accelerator only: no startup timings on CPU"
    return out
  built = bench.our_train_step(build=False)  # The train suite's, in this process: not built again for this.
  if built is not None:
    out["create_state_s"], out["compile_s"] = built.info["create_state_s"], built.info["compile_s"]
  reuse = bool(cache_dir) and built is not None
  with (contextlib.nullcontext(cache_dir) if reuse else tempfile.TemporaryDirectory()) as directory:
    if reuse:
      out["note"] = f"cache cold: this process's compile, which wrote the cache in {directory}"
    for which in ("warm",) if reuse else ("cold", "warm"):
      _log(f"[{p.name}] startup: compiling in a fresh process, persistent cache {which}")
      child = _compile_in_child(bench, directory)
      if "error" in child:
        out[f"{which}_cache_error"] = child["error"]
        break
      for key in ("compile_s", "create_state_s", "create_state_phases_s", "process_s"):
        out[f"{which}_cache_{key}"] = child[key]
  return out


def default_compiler_option_sets(platform: str | None = None) -> dict[str, dict[str, Any]]:
  """The XLA options the compiler_options suite tries on `platform` by default, most wanted first. On a
  GPU, what XLA spends compile time on besides code generation: the Triton GEMM fusions it autotunes
  (off: cuBLAS alone), and autotuning itself (cuDNN convolution algorithms, GEMM configurations, each run
  on the device; level 0 skips it, level 1 runs it on uninitialized data without the correctness checks
  of the default level 4)."""
  if (platform or jax.default_backend()) == "gpu":
    return {"no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
            "autotune_level_0": {"xla_gpu_autotune_level": 0},
            "autotune_level_1": {"xla_gpu_autotune_level": 1}}
  return {}


def parse_compiler_option_set(text: str) -> tuple[str, dict[str, Any]]:
  """'NAME:OPTION=VALUE[,OPTION=VALUE...]' → (NAME, {OPTION: VALUE}); VALUE as bool (true/false), int,
  float or string."""
  name, sep, rest = text.partition(":")
  if not sep or not name or not rest:
    raise ValueError(f"bad XLA option set {text!r}: write NAME:OPTION=VALUE[,OPTION=VALUE...]")
  options = {}
  for item in rest.split(","):
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ValueError(f"bad XLA option {item!r} in {text!r}: write OPTION=VALUE")
    options[key] = _option_value(value)
  return name, options


def _option_value(text: str) -> Any:
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def bench_compiler_options(bench: Bench, option_sets: dict[str, dict[str, Any]], steps: int, blocks: int,
                           cache_dir: str = "", save: Callable[[dict], None] = lambda partial: None) -> dict:
  """Our train step compiled with each set of XLA options (over compiler.options(), which `default` has)
  and timed side by side with `default` right after: compile s (XLA's alone, the lowering excluded, on
  both sides), step s, speed_vs_default (> 1: faster steps) and compile_vs_default. Options this jaxlib
  rejects are recorded as errors. `save` gets the results so far after each set, so that a run stopped by
  a time limit keeps them.

  With `cache_dir` (the persistent cache this process uses), each set compiles cold in a fresh process,
  which writes the cache, and this process loads that program from it to time it: compiling again here
  would reuse the autotuning results XLA keeps in memory from earlier compiles of the same fusions, and
  the time would not be a cold one. Without it, compiles run here (`compiled_in`: this process)."""
  p = bench.preset
  if not _runs_here(p):
    return {"note": f"{p.name} runs on an accelerator only: no compiles or timings on CPU"}
  if not option_sets:
    return {"note": f"no XLA option sets to try on {jax.default_backend()} (give --compiler_option_set)"}
  ours = bench.our_train_step()
  default_compile_s = ours.info["compile_s"] - ours.info["lower_s"]
  out: dict[str, Any] = {"compiled_in": "fresh processes" if cache_dir else "this process",
                         "default": {"options": compiler.options(), "compile_s": default_compile_s}}
  jax.block_until_ready(ours.run_once())
  for name, options in option_sets.items():
    _log(f"[{p.name}] compiler_options: compiling ours with {name} {options}")
    row: dict[str, Any] = {"options": options}
    out[name] = row
    try:
      if cache_dir:
        child = _compile_in_child(bench, cache_dir, options, create_state=False)
        if "error" in child:
          raise RuntimeError(child["error"])
        row["compile_s"] = child["xla_compile_s"]
        compiled, row["load_s"] = _timed_compile(ours.lowered, options)
      else:
        compiled, row["compile_s"] = _timed_compile(ours.lowered, options)
    except Exception as e:  # pylint: disable=broad-except  (an option this jaxlib lacks: recorded, next set)
      lines = str(e).strip().splitlines()
      row["error"] = f"{type(e).__name__}: {lines[-1] if lines else ''}"[:500]
      save(out)
      continue
    run_variant = functools.partial(ours.run_once, compiled)
    jax.block_until_ready(run_variant())
    seconds = interleaved_seconds({"default": ours.run_once, name: run_variant}, blocks, steps)
    out["default"].setdefault("step_s_per_block", []).extend(seconds["default"])
    row["step_s_per_block"] = seconds[name]
    row["step_s"] = statistics.median(seconds[name])
    row["speed_vs_default"] = statistics.median(seconds["default"]) / row["step_s"]
    row["compile_vs_default"] = row["compile_s"] / default_compile_s
    save(out)
  if "step_s_per_block" in out["default"]:
    out["default"]["step_s"] = statistics.median(out["default"]["step_s_per_block"])
  return out


def _timed_compile(lowered, options: dict[str, Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = lowered.compile(compiler_options=options)
  return compiled, time.perf_counter() - start


def bench_memory(bench: Bench, steps: int, blocks: int) -> dict:
  p = bench.preset
  out: dict[str, Any] = {}
  if not _runs_here(p):  # XLA:CPU's memory plan says little about a GPU's, and takes minutes per policy.
    out["note"] = f"{p.name} runs on an accelerator only: no memory measurements on CPU"
    return out
  for policy in REMAT_POLICIES:
    _log(f"[{p.name}] memory: remat {policy}")
    config = presets.our_config(p, bench.dtype, bench.attention)
    config.model.remat_policy = policy
    run = build.build(config, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
    row = {}
    state, _ = run.create_state(jax.random.PRNGKey(0))
    batch = bench.batch()
    compiled, row["compile_s"], _, _ = bench.compile_step(run, state, batch)
    step = CompiledStep(compiled, {"state": state}, batch, {})
    jax.block_until_ready(step.run_once())
    row["step_s"] = statistics.median(interleaved_seconds({policy: step.run_once}, blocks, steps)[policy])
    del step
    row.update(_memory_mib(compiled))
    out[policy] = row
  limit = memory_fit.device_limit(jax.devices()[:1])
  if limit is not None:  # What remat_policy=auto would train with, of the policies measured here.
    out["device_limit_mib"] = round(limit[0] / 2**20, 2)
    out["auto_picks"] = next((policy for policy in memory_fit.AUTO_ORDER if policy in out
                              and out[policy]["peak_mib"] is not None
                              and memory_fit.fits(out[policy]["peak_mib"] * 2**20, limit[0], auto=True)), None)
  return out


def bench_input(bench: Bench, train: dict | None, steps: int, blocks: int, data_dir: str) -> dict:
  """The digits pipeline at the preset's batch size vs the images/s our train step consumes."""
  p = bench.preset
  out: dict[str, Any] = {"dataset": "digits", "batch_size": p.batch_size}
  # pylint: disable=g-import-not-at-top  (TFDS, grain and TensorFlow: only this suite needs them)
  from configs import digits
  from diffusion_jax.data import pipeline
  from diffusion_jax.text.tokenizer import ByteTokenizer
  config = digits.get_config()
  config.batch_size = p.batch_size
  config.dataset.data_dir = data_dir
  spec_dir = os.path.join(pipeline.data_dir(config), "digits")
  if not os.path.isdir(spec_dir):
    out["note"] = (f"skipped: digits is not prepared in {pipeline.data_dir(config)} (pass --data_dir=<a TFDS dir "
                   f"holding it>, or run any digits training once to prepare it)")
    return out
  _log(f"[{p.name}] input: digits pipeline at batch {p.batch_size}")
  iterator = pipeline.create_train_iterator(config, tokenizer=ByteTokenizer(config.text.max_length))
  for _ in range(3):  # Warm-up: the read threads start and fill their prefetch buffer.
    next(iterator)
  count = max(20, steps * blocks)
  start = time.perf_counter()
  for _ in range(count):
    next(iterator)
  out["examples_per_s"] = count * p.batch_size / (time.perf_counter() - start)
  images_per_s = (train or {}).get("images_per_s")
  if images_per_s is None and _runs_here(p):
    images_per_s = bench_train(bench, steps, blocks, peak=float("inf"), with_peer=False)["images_per_s"]
  if images_per_s:
    out["train_images_per_s"] = images_per_s
    out["input_headroom"] = out["examples_per_s"] / images_per_s
  return out


@contextlib.contextmanager
def _compilation_cache(directory: str):
  """Without `directory`, JAX's persistent compilation cache off, so that compile times are cold. With
  it, the cache on in `directory` for every program (none too small or too quick to keep): compile times
  are cold only if it starts empty, and the startup suite's fresh process then reads what they wrote.
  The settings before are restored afterwards."""
  settings = {"jax_enable_compilation_cache": bool(directory)}
  if directory:  # As _cache_env gives child processes.
    settings.update(jax_compilation_cache_dir=directory, jax_persistent_cache_min_compile_time_secs=0,
                    jax_persistent_cache_min_entry_size_bytes=0, jax_persistent_cache_enable_xla_caches=_NO_XLA_CACHES)
  before = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  try:
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)


def default_presets() -> list[str]:
  return ["small", "medium"] if jax.default_backend() == "cpu" else ["small", "medium", "sd21"]


def run_benchmarks(names: list[str], suites: list[str], *, steps: int = 5, blocks: int = 3,
                   sampler_steps: int = 50, dtype: str | None = None, attention: str = "auto",
                   data_dir: str = "", out: str = "", trace_dir: str = "", peer: bool = True,
                   compilation_cache_dir: str = "", compiler_option_sets: dict[str, dict] | None = None) -> dict:
  """Runs `suites` for each preset in `names`; returns the results. With `out`, they are written there
  as JSON after each suite, so that a run cut short (a lease's time limit) keeps what finished. The
  profile suite's traces go to `trace_dir` (default: beside `out`, or ./benchmark_traces). With
  `compilation_cache_dir`, JAX's persistent compilation cache is on in it (see _compilation_cache); else
  off. compiler_option_sets: the compiler_options suite's (default: default_compiler_option_sets())."""
  if compiler_option_sets is None:
    compiler_option_sets = default_compiler_option_sets()
  why_no_peer = peer_lib.available() if {"train", "sampler", "profile"} & set(suites) else "not needed"
  if not peer and why_no_peer is None:
    why_no_peer = "--nopeer"
  trace_dir = trace_dir or (os.path.splitext(out)[0] + "_traces" if out else "benchmark_traces")
  with_peer = why_no_peer is None
  if not with_peer and why_no_peer != "not needed":
    _log(f"peer skipped: {why_no_peer}")
  device = jax.devices()[0]
  results: dict[str, Any] = {
      "device": str(device), "device_kind": device.device_kind, "backend": jax.default_backend(),
      "cpu": host.cpu_model(), "jax": jax.__version__, "suites": suites, "steps_per_block": steps,
      "blocks": blocks, "attention": attention, "configs": {}}
  if compilation_cache_dir:
    entries = len(os.listdir(compilation_cache_dir)) if os.path.isdir(compilation_cache_dir) else 0
    results["compilation_cache"] = {"dir": compilation_cache_dir, "entries_at_start": entries}
    if entries:
      _log(f"the compilation cache {compilation_cache_dir} holds {entries} entries: compile times may not be cold")
  cpu_times_at_start = host.cpu_times()
  if with_peer:
    import diffusers  # pylint: disable=g-import-not-at-top  (imported by peer_lib already, with USE_TORCH=0)
    results["diffusers"] = diffusers.__version__
  elif why_no_peer != "not needed":
    results["peer_skipped"] = why_no_peer
  with _compilation_cache(compilation_cache_dir):
    for name in names:
      preset = presets.get(name)
      _log(f"[{name}] building ({preset.image_size}×{preset.image_size}×4, batch {preset.batch_size}, "
           f"{dtype or preset.dtype})")
      bench = Bench(preset, dtype, attention)
      entry: dict[str, Any] = {"dtype": bench.dtype, "batch_size": preset.batch_size,
                               "input_shape": list(preset.input_shape),
                               "context": [preset.context_length, preset.context_width]}
      results["configs"][name] = entry
      suite_runners = {
          "train": lambda: bench_train(bench, steps, blocks, _matmul_peak(results, bench.dtype), with_peer),
          "sampler": lambda: bench_sampler(bench, sampler_steps, blocks, with_peer),
          "startup": lambda: bench_startup(bench, compilation_cache_dir),
          "memory": lambda: bench_memory(bench, steps, blocks),
          "input": lambda: bench_input(bench, entry.get("train"), steps, blocks, data_dir),
          "profile": lambda: bench_profile(bench, steps, trace_dir, with_peer),
          "compiler_options": lambda: bench_compiler_options(
              bench, compiler_option_sets, steps, blocks, compilation_cache_dir,
              lambda partial: _save_partial(out, results, entry, "compiler_options", partial))}
      for suite in suites:
        try:
          entry[suite] = suite_runners[suite]()
        except Exception as e:  # pylint: disable=broad-except  (recorded; the other suites still run)
          _log(f"[{name}] {suite} failed:\n{traceback.format_exc()}")
          entry[suite] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        if out:
          _write_json(out, results)
  # Time the hypervisor gave other guests while the suite ran: high values mean absolute numbers (not
  # the side-by-side ratios) are slowed by a shared machine.
  results["cpu_steal_fraction"] = host.steal_fraction(cpu_times_at_start, host.cpu_times())
  if out:
    _write_json(out, results)
  return results


def _matmul_peak(results: dict, dtype: str) -> float:
  """The matmul peak in `dtype` (FLOP/s), measured once per run and recorded in `results`."""
  peaks = results.setdefault("matmul_peak_gflop_s", {})
  if dtype not in peaks:
    _log(f"measuring the {dtype} matmul peak")
    peaks[dtype] = matmul_peak_flops(dtype) / 1e9
  return peaks[dtype] * 1e9


def _save_partial(out: str, results: dict, entry: dict, suite: str, partial: dict) -> None:
  """A suite's results so far, written (with everything else) where `out` says, if anywhere."""
  entry[suite] = partial
  if out:
    _write_json(out, results)


def _write_json(path: str, results: dict) -> None:
  """Writes `results` to `path` atomically, so the file is always whole."""
  paths.write_text_atomic(path, json.dumps(_rounded(results), indent=2))


def _rounded(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _rounded(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_rounded(v) for v in tree]
  if isinstance(tree, float):
    return float(f"{tree:.4g}")
  return tree


def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return "yes" if value else "NO"
  if isinstance(value, float):
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
  return f"{value:,}" if isinstance(value, int) else str(value)


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a is not None and b else None


def _gflop(flops: int | None) -> float | None:
  return None if flops is None else flops / 1e9


def table_rows(results: dict) -> list[tuple[str, ...]]:
  """(config, suite, measurement, ours, peer, ours/peer) rows."""
  rows = []
  for name, entry in results["configs"].items():
    def row(suite, label, ours, peer=None, ratio=None):
      if ours is not None or peer is not None:
        rows.append((name, suite, label, _fmt(ours), _fmt(peer), _fmt(ratio)))

    train = entry.get("train")
    if train:
      row("train", "images/s", train.get("images_per_s"), train.get("peer_images_per_s"),
          train.get("ratio_vs_peer"))
      row("train", "images/s, peer with our XLA options", train.get("images_per_s"),
          train.get("peer_our_options_images_per_s"), train.get("ratio_vs_peer_our_options"))
      row("train", "compile s", train.get("compile_s"), train.get("peer_compile_s"))
      row("train", "create_state s", train.get("create_state_s"))
      for phase, phase_s in (train.get("create_state_phases_s") or {}).items():
        row("train", f"  of which {phase} s", phase_s)
      row("train", "U-Net params", train.get("unet_params"), train.get("peer_unet_params"),
          train.get("unet_params_equal"))
      row("train", "U-Net forward GFLOP", train.get("forward_gflop"), train.get("peer_forward_gflop"),
          _ratio(train.get("forward_gflop"), train.get("peer_forward_gflop")))
      row("train", "U-Net forward conv+matmul GFLOP", _gflop(train.get("forward_matmul_flops")),
          _gflop(train.get("peer_forward_matmul_flops")), train.get("forward_flops_equal"))
      row("train", "model GFLOP per step (3 × forward conv+matmul)", train.get("model_gflop"),
          train.get("model_gflop") if "peer_unet_params" in train else None)
      row("train", "step GFLOP (XLA's count of the compiled step)", train.get("step_gflop"),
          train.get("peer_step_gflop"))
      row("train", "achieved GFLOP/s", train.get("achieved_gflop_s"), train.get("peer_achieved_gflop_s"))
      row("train", "fraction of matmul peak", train.get("fraction_of_matmul_peak"),
          train.get("peer_fraction_of_matmul_peak"))
      row("train", "step peak MiB", train.get("peak_mib"), train.get("peer_peak_mib"))
    sampler = entry.get("sampler")
    if sampler and "s_per_call" in sampler:
      row("sampler", f"s/call ({sampler['num_steps']} steps)", sampler.get("s_per_call"),
          sampler.get("peer_s_per_call"), sampler.get("ratio_vs_peer"))
      row("sampler", "s/call, peer with our XLA options", sampler.get("s_per_call"),
          sampler.get("peer_our_options_s_per_call"), sampler.get("ratio_vs_peer_our_options"))
      row("sampler", "s/image", sampler.get("s_per_image"), sampler.get("peer_s_per_image"))
      row("sampler", "compile s", sampler.get("compile_s"), sampler.get("peer_compile_s"))
    startup = entry.get("startup")
    if startup and ("create_state_s" in startup or "cold_cache_compile_s" in startup):
      row("startup", "create_state s", startup.get("create_state_s"))
      row("startup", "compile s (in process)", startup.get("compile_s"))
      row("startup", "create_state s, cache cold", startup.get("cold_cache_create_state_s"))
      row("startup", "create_state s, cache warm", startup.get("warm_cache_create_state_s"))
      for phase, phase_s in (startup.get("warm_cache_create_state_phases_s") or {}).items():
        row("startup", f"  of which {phase} s", phase_s)
      row("startup", "compile s, cache cold", startup.get("cold_cache_compile_s"))
      row("startup", "compile s, cache warm", startup.get("warm_cache_compile_s"))
      row("startup", "process s, cache cold", startup.get("cold_cache_process_s"))
      row("startup", "process s, cache warm", startup.get("warm_cache_process_s"))
    for policy in REMAT_POLICIES:
      mem = (entry.get("memory") or {}).get(policy)
      if mem:
        row("memory", f"remat {policy}: peak MiB", mem.get("peak_mib"))
        row("memory", f"remat {policy}: temp MiB", mem.get("temp_mib"))
        row("memory", f"remat {policy}: step s", mem.get("step_s"))
    if "device_limit_mib" in (entry.get("memory") or {}):
      row("memory", "device memory limit MiB", entry["memory"]["device_limit_mib"])
      rows.append((name, "memory", f"remat_policy=auto would train with: {entry['memory']['auto_picks']}",
                   "", "", ""))
    for option_set, tried in (entry.get("compiler_options") or {}).items():
      if isinstance(tried, dict) and "options" in tried:
        label = "default" if option_set == "default" else f"{option_set} {tried['options']}"
        row("compiler_options", f"{label}: XLA compile s", tried.get("compile_s"), None,
            tried.get("compile_vs_default"))
        row("compiler_options", f"{label}: step s", tried.get("step_s"), None, tried.get("speed_vs_default"))
        if "error" in tried:
          rows.append((name, "compiler_options", f"{label}: error: {tried['error']}", "", "", ""))
    inp = entry.get("input")
    if inp and "examples_per_s" in inp:
      row("input", "pipeline examples/s", inp["examples_per_s"])
      row("input", "input_headroom", inp.get("input_headroom"))
    prof = entry.get("profile") or {}
    if "ours" in prof:
      ours_p, peer_p = prof["ours"], prof.get("peer", {})
      row("profile", "traced ms/step (wall)", ours_p["wall_ms_per_call"], peer_p.get("wall_ms_per_call"),
          _ratio(ours_p["wall_ms_per_call"], peer_p.get("wall_ms_per_call")))
      for category in profile_lib.CATEGORIES:
        ours_c, peer_c = ours_p["categories"].get(category), peer_p.get("categories", {}).get(category)
        if ours_c or peer_c:
          ours_ms, peer_ms = (ours_c or {}).get("ms"), (peer_c or {}).get("ms")
          row("profile", f"{category} ms/step", ours_ms, peer_ms, _ratio(ours_ms, peer_ms))
      ours_u, peer_u = ours_p.get("unattributed_device_ms_per_call"), peer_p.get("unattributed_device_ms_per_call")
      if ours_u or peer_u:
        row("profile", "device ms/step naming no HLO op", ours_u, peer_u, _ratio(ours_u, peer_u))
    for suite in SUITES:
      for key in ("note", "error"):
        text = (entry.get(suite) or {}).get(key)
        if text:
          rows.append((name, suite, f"{key}: {text}" if key == "error" else text, "", "", ""))
  return rows


def format_table(results: dict) -> str:
  header = ("config", "suite", "measurement", "ours", "peer", "ours/peer")
  rows = table_rows(results)
  widths = [max(len(r[i]) for r in [header] + rows if i < 2 or r[3:] != ("", "", "")) for i in range(3)]
  lines = []
  for r in [header] + rows:
    if r[3:] == ("", "", ""):  # A note: free text after the suite.
      lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
      continue
    lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>12}  {r[4]:>12}  {r[5]:>9}")
  head = f"device: {results['device']} ({results['backend']}; CPU {results['cpu']}), jax {results['jax']}"
  if "diffusers" in results:
    head += f", diffusers {results['diffusers']}"
  for dtype, peak in results.get("matmul_peak_gflop_s", {}).items():
    head += f", {dtype} matmul peak {peak:.4g} GFLOP/s"
  if results.get("cpu_steal_fraction") is not None:
    head += f", CPU steal {results['cpu_steal_fraction']:.0%} of the run (time other guests took)"
  return "\n".join([head] + lines)


# Flags are defined only when this module is the program: the tests import it next to other modules
# that define flags of the same names (--config, --out, --steps).
def _define_flags() -> None:
  def check_list(allowed: tuple[str, ...], what: str, extra: tuple[str, ...] = ()) -> Callable[[list[str]], bool]:
    def check(values):
      bad = [v for v in values or () if v not in allowed + extra]
      if bad:
        raise flags.ValidationError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed + extra)}")
      return True
    return check

  flags.DEFINE_list("suite", ["all"], f"Suites to run, in this order: {', '.join(SUITES)} or all.")
  flags.DEFINE_enum("attention", "auto", list(attention_lib.IMPLEMENTATIONS),
                    "Our U-Net's and text encoder's attention kernel (config.model.attention).")
  flags.DEFINE_list("config", None, f"Presets: {', '.join(presets.PRESETS)} (default: small,medium on CPU, "
                    "small,medium,sd21 on an accelerator).")
  flags.DEFINE_string("out", "", "Write the results as JSON here.")
  flags.DEFINE_bool("peer", True, "Also build and time the peer (--nopeer: ours only, e.g. to compare XLA flags).")
  flags.DEFINE_integer("steps", 5, "Timed steps per block (train, memory).", lower_bound=1)
  flags.DEFINE_integer("blocks", 3, "Timed blocks per side; the median block is reported.", lower_bound=1)
  flags.DEFINE_integer("sampler_steps", 50, "DDIM steps of the sampler suite.", lower_bound=1, upper_bound=1000)
  flags.DEFINE_enum("dtype", None, list(COMPUTE_DTYPES), "Compute dtype of both networks (default: the preset's).")
  flags.DEFINE_string("trace_dir", "", "Where the profile suite writes its traces (default: beside --out, or "
                      "./benchmark_traces).")
  flags.DEFINE_string("data_dir", "", "TFDS data dir holding the prepared digits dataset (input suite; default: "
                      "the pipeline's).")
  flags.DEFINE_string("compilation_cache_dir", "", "Turn JAX's persistent compilation cache on in this directory "
                      "(give an empty one for cold compile times; the startup suite then reads it from a fresh "
                      "process instead of compiling cold there again). Default: off.")
  # Not --xla_...: JAX puts every command-line argument that starts with --xla into its persistent cache
  # keys, and the startup suite's fresh process, which has no such argument, would then miss the cache.
  flags.DEFINE_multi_string("compiler_option_set", None, "compiler_options suite: NAME:OPTION=VALUE[,OPTION=VALUE...], "
                            "repeatable (default: per backend, benchmarks.run.default_compiler_option_sets).")
  flags.register_validator("suite", check_list(SUITES, "suite", ("all",)))

  def check_option_sets(values):
    for value in values or ():
      try:
        parse_compiler_option_set(value)
      except ValueError as e:
        raise flags.ValidationError(str(e)) from e
    return True
  flags.register_validator("compiler_option_set", check_option_sets)
  flags.register_validator("config", check_list(tuple(presets.PRESETS), "preset"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; give options as --name=value")
  f = flags.FLAGS
  suites = list(SUITES) if "all" in f.suite else list(dict.fromkeys(f.suite))  # In the order given.
  names = f.config or default_presets()
  results = run_benchmarks(names, suites, steps=f.steps, blocks=f.blocks, sampler_steps=f.sampler_steps,
                           dtype=f.dtype, attention=f.attention, data_dir=f.data_dir, out=f.out,
                           trace_dir=f.trace_dir, peer=f.peer, compilation_cache_dir=f.compilation_cache_dir,
                           compiler_option_sets=(dict(map(parse_compiler_option_set, f.compiler_option_set))
                                            if f.compiler_option_set else None))
  print(format_table(results))
  if f.out:
    print(f"results: {f.out}")
  failed = [f"{name} {suite}" for name, entry in results["configs"].items() for suite in suites
            if "error" in entry.get(suite, {})]
  if failed:
    raise SystemExit(f"failed: {', '.join(failed)} (the errors are in the log above and in the results)")


if __name__ == "__main__":
  sys.path.insert(0, _REPO_ROOT)  # configs/ (imported by presets) lives at the repository root.
  _define_flags()
  app.run(main)
