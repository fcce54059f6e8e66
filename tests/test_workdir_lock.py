"""The workdir lock: one live run per workdir, stale locks (dead pid, old heartbeat) taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from diffusion_jax import workdir_lock
from diffusion_jax.errors import UserError


def _write_lock(workdir, *, host=None, pid=None, heartbeat_age_s=0.0, token="theirs"):
  """A lock file as another run would have left it."""
  now = time.time()
  content = {"host": host or socket.gethostname(), "pid": pid or os.getpid(),
             "pid_namespace": workdir_lock._pid_namespace(), "token": token,  # pylint: disable=protected-access
             "start_time": now - heartbeat_age_s - 1, "heartbeat_time": now - heartbeat_age_s}
  with open(os.path.join(workdir, ".lock"), "w") as f:
    json.dump(content, f)


def _dead_pid():
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def test_second_hold_refused_then_reacquired_after_release(tmp_path):
  with workdir_lock.hold(str(tmp_path)) as lock:
    assert workdir_lock.read_holder(str(tmp_path))["token"] == lock.token
    with pytest.raises(UserError) as info:
      workdir_lock.hold(str(tmp_path)).__enter__()
    message = str(info.value)
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message
    assert f"delete {tmp_path}/.lock" in message
  assert not (tmp_path / ".lock").exists()
  with workdir_lock.hold(str(tmp_path)):
    assert (tmp_path / ".lock").exists()


def test_release_is_idempotent(tmp_path):
  lock = workdir_lock.hold(str(tmp_path))
  lock.acquire()
  lock.release()
  lock.release()
  assert not (tmp_path / ".lock").exists()


def test_dead_pid_on_this_host_is_taken_over(tmp_path):
  _write_lock(str(tmp_path), pid=_dead_pid())
  with workdir_lock.hold(str(tmp_path)) as lock:
    assert workdir_lock.read_holder(str(tmp_path))["token"] == lock.token
  assert not list(tmp_path.iterdir())  # No .lock.stale.* left behind.


def test_live_pid_with_old_heartbeat_is_taken_over(tmp_path):
  _write_lock(str(tmp_path), pid=os.getpid(), heartbeat_age_s=30)
  with pytest.raises(UserError, match="is in use"):
    workdir_lock.hold(str(tmp_path), stale_after_s=60, heartbeat_s=1).__enter__()
  with workdir_lock.hold(str(tmp_path), stale_after_s=20, heartbeat_s=1) as lock:
    assert workdir_lock.read_holder(str(tmp_path))["token"] == lock.token


def test_other_host_taken_over_only_when_heartbeat_is_old(tmp_path):
  _write_lock(str(tmp_path), host="elsewhere", pid=_dead_pid(), heartbeat_age_s=5)
  with pytest.raises(UserError, match="host elsewhere"):
    workdir_lock.hold(str(tmp_path)).__enter__()
  assert workdir_lock.read_holder(str(tmp_path))["token"] == "theirs"
  _write_lock(str(tmp_path), host="elsewhere", heartbeat_age_s=601)
  with workdir_lock.hold(str(tmp_path)) as lock:
    assert workdir_lock.read_holder(str(tmp_path))["token"] == lock.token


def test_unparseable_lock_is_stale_only_once_old(tmp_path):
  path = tmp_path / ".lock"
  path.write_bytes(b"")
  with pytest.raises(UserError, match="being written"):
    workdir_lock.hold(str(tmp_path)).__enter__()
  old = time.time() - workdir_lock.UNWRITTEN_GRACE_S - 5
  os.utime(path, (old, old))
  with workdir_lock.hold(str(tmp_path)) as lock:
    assert workdir_lock.read_holder(str(tmp_path))["token"] == lock.token


def test_take_over_puts_back_a_lock_that_changed_since_it_was_judged_stale(tmp_path):
  _write_lock(str(tmp_path), pid=_dead_pid())
  judged = (tmp_path / ".lock").read_bytes()
  _write_lock(str(tmp_path), token="newer")  # A run that took it over (or heartbeated) meanwhile.
  lock = workdir_lock.hold(str(tmp_path))
  with pytest.raises(UserError, match="is in use"):
    lock._take_over(judged, "test")  # pylint: disable=protected-access
  assert workdir_lock.read_holder(str(tmp_path))["token"] == "newer"
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_release_keeps_a_lock_that_is_not_ours(tmp_path):
  lock = workdir_lock.hold(str(tmp_path))
  lock.acquire()
  _write_lock(str(tmp_path), token="theirs")
  lock.release()
  assert workdir_lock.read_holder(str(tmp_path))["token"] == "theirs"


def test_heartbeat_updates_the_time_and_stops_when_not_ours(tmp_path):
  with workdir_lock.hold(str(tmp_path), heartbeat_s=0.05) as lock:
    first = workdir_lock.read_holder(str(tmp_path))["heartbeat_time"]
    deadline = time.time() + 5
    while workdir_lock.read_holder(str(tmp_path))["heartbeat_time"] == first and time.time() < deadline:
      time.sleep(0.02)
    assert workdir_lock.read_holder(str(tmp_path))["heartbeat_time"] > first
    _write_lock(str(tmp_path), token="theirs", heartbeat_age_s=100)
    lock._thread.join(timeout=5)  # pylint: disable=protected-access
    assert not lock._thread.is_alive()  # pylint: disable=protected-access
    assert workdir_lock.read_holder(str(tmp_path))["token"] == "theirs"
  assert workdir_lock.read_holder(str(tmp_path))["token"] == "theirs"


def test_lock_held_by_another_process_until_it_is_killed(tmp_path):
  code = ("import sys, time\n"
          "from diffusion_jax import workdir_lock\n"
          "workdir_lock.hold(sys.argv[1]).__enter__()\n"
          "print('held', flush=True)\n"
          "time.sleep(600)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
  try:
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {child.pid}"):
      workdir_lock.hold(str(tmp_path)).__enter__()
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()  # Reaped: a zombie would still answer os.kill(pid, 0).
    child.stdout.close()
  with workdir_lock.hold(str(tmp_path)) as lock:
    assert workdir_lock.read_holder(str(tmp_path))["token"] == lock.token


def test_missing_workdir_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    workdir_lock.hold(str(tmp_path / "nope")).__enter__()
