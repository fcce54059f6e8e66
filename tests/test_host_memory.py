"""diffusion_jax/host_memory.py: when the huge-page tunable is added, and that a command re-executes once."""

import os
import subprocess
import sys
import textwrap

import pytest

from diffusion_jax import host_memory


def test_the_tunable_is_appended_to_existing_ones():
  env = host_memory.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and env["HOME"] == "/h"
  assert host_memory.with_huge_pages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_not_wanted_when_set_or_opted_out(monkeypatch):
  monkeypatch.setattr(host_memory, "_glibc_has_tunable", lambda: True)
  monkeypatch.setattr(host_memory, "_transparent_huge_pages_allowed", lambda: True)
  monkeypatch.setattr(sys, "platform", "linux")
  assert host_memory.wanted({})
  assert not host_memory.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})  # The user's choice stands.
  assert not host_memory.wanted({"DIFFUSION_JAX_HUGE_PAGES": "0"})
  monkeypatch.setattr(host_memory, "_transparent_huge_pages_allowed", lambda: False)
  assert not host_memory.wanted({})
  monkeypatch.setattr(host_memory, "_transparent_huge_pages_allowed", lambda: True)
  monkeypatch.setattr(sys, "platform", "darwin")
  assert not host_memory.wanted({})


def test_a_command_re_executes_itself_once_with_the_tunable(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DIFFUSION_JAX_HUGE_PAGES")}
  if not host_memory.wanted(env):
    pytest.skip("no glibc >= 2.35 with transparent huge pages here: nothing to re-execute")
  script = tmp_path / "entry.py"
  script.write_text(textwrap.dedent("""\
      import os, sys
      print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
      from diffusion_jax import host_memory
      host_memory.use_huge_pages()
      print("after", os.getpid(), os.environ["GLIBC_TUNABLES"], flush=True)
      """))
  out = subprocess.run([sys.executable, str(script), "--flag=a b"], env=env, capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split("\n")
  first_pid = out[0].split()[1]
  assert out[0] == f"start {first_pid} None ['--flag=a b']"
  assert out[1] == f"start {first_pid} glibc.malloc.hugetlb=1 ['--flag=a b']"  # Same process, same arguments.
  assert out[2] == f"after {first_pid} glibc.malloc.hugetlb=1" and out[3] == ""
