"""The benchmarks' host report (benchmarks/host.py): CPU steal time read from /proc/stat."""

import os

import pytest

from benchmarks import host

# Two aggregate `cpu` lines read ~11 s apart on this 2-core shared VM (100 ticks/s per core) while a
# training ran: user nice system idle iowait irq softirq steal guest guest_nice. The per-core `cpu0`
# lines are made up: they differ from the aggregate, so reading them instead would fail the test.
_BEFORE = """cpu  3401239 0 148653 9790182 6338 0 3430 272297 0 0
cpu0 1700000 0 74000 4895000 3000 0 1700 136000 0 0
intr 123456
"""
_AFTER = """cpu  3401941 0 148729 9790671 6338 0 3432 273232 0 0
cpu0 1700400 0 74040 4895200 3000 0 1701 136500 0 0
"""


def test_steal_fraction_is_the_share_of_all_ticks_the_hypervisor_took():
  before, after = host.parse_cpu_times(_BEFORE), host.parse_cpu_times(_AFTER)
  # busy: user 702 + system 76 + softirq 2 = 780; idle 489; steal 935: 2,204 ticks in all.
  assert (after.busy - before.busy, after.idle - before.idle, after.steal - before.steal) == (780, 489, 935)
  assert host.steal_fraction(before, after) == pytest.approx(935 / 2204)


def test_guest_time_is_not_counted_twice_and_old_kernels_have_no_steal():
  # guest (column 9) is already inside user: its 7 ticks must not be added to busy or total.
  with_guest = host.parse_cpu_times("cpu 10 0 5 80 5 0 0 0 7 0\n")
  assert (with_guest.busy, with_guest.idle, with_guest.steal, with_guest.total) == (15, 85, 0, 100)
  old_kernel = host.parse_cpu_times("cpu 10 0 5 80 5 0 0\n")  # Before 2.6.11: no steal column.
  assert (old_kernel.steal, old_kernel.total) == (0, 100)


def test_missing_or_unchanged_readings_give_no_fraction():
  reading = host.parse_cpu_times(_BEFORE)
  assert host.steal_fraction(None, reading) is None and host.steal_fraction(reading, None) is None
  assert host.steal_fraction(reading, reading) is None
  with pytest.raises(ValueError, match="no aggregate 'cpu' line"):
    host.parse_cpu_times("intr 1 2 3\n")


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc/stat (not Linux)")
def test_this_machine_reports_a_fraction_between_zero_and_one_and_a_cpu_model():
  before = host.cpu_times()
  sum(i * i for i in range(200_000))  # Some CPU time between the readings.
  after = host.cpu_times()
  fraction = host.steal_fraction(before, after)
  assert fraction is None or 0 <= fraction <= 1
  assert host.cpu_model()
