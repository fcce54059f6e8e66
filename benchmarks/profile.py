"""Where a compiled program's time goes: a jax.profiler trace of a few calls, its XLA ops in categories.

  breakdown = profile.trace_and_break_down(run_once, compiled, calls=3, trace_dir="traces/small/ours")

The trace (`trace_dir/plugins/profile/<run>/`, with a Perfetto `perfetto_trace.json.gz`) opens in
TensorBoard's profile plugin or ui.perfetto.dev; `trace_dir/module.hlo.txt` is the compiled module whose
instructions the op events name. The breakdown joins the trace's op events to the
compiled HLO (`compiled.as_text()`): each op is put in one category by what it computes (a fusion by
the most expensive kind of op it contains), and the ms per call of each category, its share of the op
time, and the costliest ops (with the JAX source they came from) are returned.

On a CPU the op events are XLA:CPU's thunks, whose names are the HLO instructions'; on a GPU they are
kernels, which the trace tags with their HLO op (`hlo_op`). Op time is the sum of op durations: on a
multi-threaded CPU it can exceed the wall time; on a GPU, wall − op time is the time the device idled
(host syncs, launch gaps). Device events (those of a `/device:` process in the trace) that name no
instruction of the program are summed apart (`unattributed_device_ms_per_call`, `top_unattributed`):
on the H200 the categories held 76.8 ms of a 195.5 ms sd21 step, and the next GPU run names the rest.
XLA:CPU runs convolutions and matmuls asynchronously: their event covers the launch only and
completion is a separate `end: <op>` marker (a medium-preset 3×3 convolution: a 0.6 ms event, done 6.1
ms later), so on a CPU those categories are under-reported and the ops that wait for
them over-reported; compare CPU programs by timing them, as benchmarks/run.py's train suite does.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time
from typing import Any, Callable

import jax

# In order of precedence: a fusion is counted as the first of these that it contains.
CATEGORIES = ("attention kernel", "convolution", "matmul", "collective", "reduction", "transpose/copy",
              "select", "elementwise")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Control flow: the ops of their bodies have events of their own, so counting these would count twice.
_CONTROL = ("while", "conditional", "call", "async-start", "async-done", "async-update")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s}])([a-z][a-z\-]*)\(")


def _custom_call_category(line: str) -> str:
  target = (re.search(r'custom_call_target="([^"]*)"', line) or [None, ""])[1].lower()
  if any(k in target for k in ("fmha", "flash", "attention", "splash", "mha")):
    return "attention kernel"
  if "conv" in target:
    return "convolution"
  if any(k in target for k in ("gemm", "matmul", "dot")):
    return "matmul"
  return "elementwise"


def _line_category(opcode: str, line: str) -> str | None:
  """The category of one HLO instruction that is not a fusion (None: a parameter, constant, tuple…)."""
  if opcode == "convolution":
    return "convolution"
  if opcode == "dot":
    return "matmul"
  if opcode == "custom-call":
    return _custom_call_category(line)
  if opcode in _COLLECTIVES or any(opcode.startswith(c) for c in _COLLECTIVES):
    return "collective"
  if opcode in ("reduce", "reduce-window", "select-and-scatter", "sort"):
    return "reduction"
  if opcode in ("transpose", "copy", "concatenate", "slice", "dynamic-slice", "dynamic-update-slice", "pad",
                "gather", "scatter", "reverse"):
    return "transpose/copy"
  if opcode == "select":
    return "select"
  if opcode in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast", "broadcast", "reshape", "iota",
                "after-all", "partition-id", "replica-id"):
    return None
  return "elementwise"


class HloOps:
  """Instruction name → (category, JAX source op_name) for every instruction of a compiled module."""

  def __init__(self, hlo_text: str):
    computations: dict[str, list[str]] = {}
    current = None
    self._lines: dict[str, str] = {}
    for line in hlo_text.splitlines():
      header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
      if header and not line.startswith(" "):
        current = header.group(1)
        computations[current] = []
        continue
      if line.startswith("}"):
        current = None
        continue
      match = _INSTRUCTION.match(line)
      if current is not None and match:
        computations[current].append(line)
        self._lines[match.group(1)] = match.group(2)
    self._computations = computations
    self._body_category: dict[str, str | None] = {}

  def _computation_category(self, name: str) -> str | None:
    """The highest-precedence category of the instructions of computation `name` (fusions nest)."""
    if name not in self._body_category:
      self._body_category[name] = None  # Guards against cycles.
      found = {self._category(line) for line in self._computations.get(name, ())}
      self._body_category[name] = next((c for c in CATEGORIES if c in found), None)
    return self._body_category[name]

  def _category(self, line: str) -> str | None:
    match = _INSTRUCTION.match(line)
    rest = match.group(2) if match else line
    opcode_match = _OPCODE.search(rest)
    if not opcode_match:
      return None
    opcode = opcode_match.group(1)
    if opcode == "fusion":
      called = re.search(r"calls=%?([\w.\-]+)", rest)
      return (self._computation_category(called.group(1)) if called else None) or "elementwise"
    if opcode in _CONTROL:
      return None
    return _line_category(opcode, rest)

  def lookup(self, name: str) -> tuple[str, str] | None:
    """(category, source) of instruction `name`; None if the module has no such counted instruction."""
    line = self._lines.get(name)
    if line is None:
      return None
    category = self._category(line)
    if category is None:
      return None
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = self._computations.get(called.group(1), []) if called else []
    # The source of the op that gave the category (a fusion's convolution, not the bias add after it).
    defining = [l for l in body if self._category(l) == category] + body + [line]
    sources = [m for l in defining for m in re.findall(r'op_name="([^"]*)"', l)]
    return category, (_short_source(sources[0]) if sources else "")


def _short_source(op_name: str) -> str:
  """'jit(step)/jvp(DiffusionModel)/DiffusionModel.denoise/unet/up_1_res_0/conv_1/conv_general_dilated'
  → 'fwd unet/up_1_res_0/conv_1/conv_general_dilated' (bwd for the transposed, i.e. backward, pass)."""
  direction = "bwd" if "transpose(" in op_name else "fwd"
  parts = [p for p in op_name.split("/") if not re.match(r"^(jit|jvp|transpose|vmap|pjit|checkpoint|remat)\(", p)]
  parts = [p for p in parts if not p.startswith(("DiffusionModel.", "DiffusionModel"))]
  return f"{direction} {'/'.join(parts[-4:])}"


def _load_trace_events(trace_dir: str) -> list[dict[str, Any]]:
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(files[-1]) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def break_down(events: list[dict[str, Any]], ops: HloOps, calls: int, wall_s: float, top: int = 12) -> dict:
  """Per-call ms by category, shares of the op time, and the `top` costliest ops."""
  by_category: collections.Counter = collections.Counter()
  by_op: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  unattributed: collections.Counter = collections.Counter()
  device_pids = {e.get("pid") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                 and "/device:" in str((e.get("args") or {}).get("name", ""))}
  for event in events:
    if event.get("ph") != "X":
      continue
    args = event.get("args") or {}
    name = args.get("hlo_op") or event.get("name", "")
    found = ops.lookup(name)
    if found is None:
      if event.get("pid") in device_pids:  # Device time that names no instruction of this program.
        unattributed[event.get("name", "")] += float(event.get("dur", 0.0)) / 1e3 / calls
      continue
    category, source = found
    ms = float(event.get("dur", 0.0)) / 1e3 / calls
    by_category[category] += ms
    by_op[(name, category, source)] += ms
    counts[category] += 1
  op_ms = sum(by_category.values())
  return {
      "calls": calls,
      "wall_ms_per_call": wall_s * 1e3 / calls,
      "op_ms_per_call": op_ms,
      "categories": {c: {"ms": by_category[c], "share": by_category[c] / op_ms if op_ms else 0.0,
                         "ops_per_call": counts[c] // calls}
                     for c in CATEGORIES if c in by_category},
      "top_ops": [{"op": n, "category": c, "source": s, "ms": ms} for (n, c, s), ms in by_op.most_common(top)],
      "unattributed_device_ms_per_call": sum(unattributed.values()),
      "top_unattributed": [{"event": n, "ms": ms} for n, ms in unattributed.most_common(top)],
  }


def trace_and_break_down(run_once: Callable[[], Any], compiled, *, calls: int, trace_dir: str) -> dict:
  """Traces `calls` calls of `run_once` (which runs `compiled`, already warm) into `trace_dir`; returns
  `break_down` of them plus the trace's location."""
  os.makedirs(trace_dir, exist_ok=True)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    for _ in range(calls):
      result = run_once()
    jax.block_until_ready(result)
    wall_s = time.perf_counter() - start
  hlo_text = compiled.as_text()
  with open(os.path.join(trace_dir, "module.hlo.txt"), "w", encoding="utf-8") as f:
    f.write(hlo_text)  # The trace's op names are this module's instructions.
  out = break_down(_load_trace_events(trace_dir), HloOps(hlo_text), calls, wall_s)
  out["trace_dir"] = trace_dir
  return out


def format_breakdown(label: str, breakdown: dict) -> str:
  """A few readable lines: ms per call and share by category, then the costliest ops."""
  lines = [f"{label}: {breakdown['wall_ms_per_call']:.1f} ms wall, {breakdown['op_ms_per_call']:.1f} ms of ops "
           f"per call (trace: {breakdown['trace_dir']})"]
  for category, row in sorted(breakdown["categories"].items(), key=lambda kv: -kv[1]["ms"]):
    lines.append(f"  {category:<17} {row['ms']:9.2f} ms  {100 * row['share']:5.1f}%  ({row['ops_per_call']} ops)")
  for op in breakdown["top_ops"][:8]:
    lines.append(f"    {op['ms']:8.2f} ms  {op['category']:<17} {op['source'] or op['op']}")
  if breakdown.get("unattributed_device_ms_per_call"):
    lines.append(f"  device events naming no instruction: {breakdown['unattributed_device_ms_per_call']:.2f} ms")
    for event in breakdown["top_unattributed"][:5]:
      lines.append(f"    {event['ms']:8.2f} ms  {event['event'][:100]}")
  return "\n".join(lines)
