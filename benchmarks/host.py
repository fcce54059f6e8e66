"""What the benchmarks ran on, beyond JAX's device name: the CPU model, and how much of the CPU the
hypervisor took (steal time) while they ran.

On a shared virtual machine the same step can take twice as long from one hour to the next because
another guest holds the physical cores: Linux counts that time as `steal` in /proc/stat. The suite
reports ratios measured side by side, which such contention slows alike; the steal fraction says how
far its absolute numbers (images/s, compile seconds) can be trusted.
"""

from __future__ import annotations

import dataclasses
import platform

_PROC_STAT = "/proc/stat"
_CPUINFO = "/proc/cpuinfo"


@dataclasses.dataclass(frozen=True)
class CpuTimes:
  """Whole-machine CPU time counters from /proc/stat's `cpu` line, in clock ticks (USER_HZ)."""
  busy: int  # user + nice + system + irq + softirq (guest time is already inside user and nice)
  idle: int  # idle + iowait
  steal: int  # runnable, but the hypervisor ran another guest

  @property
  def total(self) -> int:
    return self.busy + self.idle + self.steal


def parse_cpu_times(proc_stat: str) -> CpuTimes:
  """The aggregate `cpu ...` line of /proc/stat's text (see proc(5)): user nice system idle iowait irq
  softirq steal [guest guest_nice]. Kernels before 2.6.11 have no steal column: it reads as 0."""
  for line in proc_stat.splitlines():
    fields = line.split()
    if fields and fields[0] == "cpu":
      ticks = [int(v) for v in fields[1:9]] + [0] * (9 - len(fields))
      user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
      return CpuTimes(busy=user + nice + system + irq + softirq, idle=idle + iowait, steal=steal)
  raise ValueError("no aggregate 'cpu' line in /proc/stat text")


def cpu_times() -> CpuTimes | None:
  """The machine's CPU time counters now, or None where there is no /proc/stat (not Linux)."""
  try:
    with open(_PROC_STAT, encoding="ascii") as f:
      return parse_cpu_times(f.read())
  except (OSError, ValueError):
    return None


def steal_fraction(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
  """The share of all CPU time between two readings that the hypervisor gave to other guests (0: none;
  0.5: half of this machine's cores' time), or None if either reading is missing or no time passed."""
  if before is None or after is None or after.total <= before.total:
    return None
  return (after.steal - before.steal) / (after.total - before.total)


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo's `model name`; `platform.processor()` elsewhere)."""
  try:
    with open(_CPUINFO, encoding="utf-8", errors="replace") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          return value.strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
