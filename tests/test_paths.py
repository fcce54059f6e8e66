"""The path layer: URL resolution (a fake scheme onto a local directory), atomic writes, the object-store
branches (no append, no directory rename) and one-line errors for unwritable directories."""

import json
import os

import numpy as np
import pytest

from diffusion_jax import paths
from diffusion_jax.errors import UserError
from diffusion_jax.metrics import writers


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  root = tmp_path / "fake_root"
  monkeypatch.setenv(paths.FAKES_ENV, f"fake={root}")
  return root


def test_urls_resolve_through_the_fake_scheme_and_local_paths_become_absolute(fake_bucket, monkeypatch, tmp_path):
  assert paths.resolve("fake://bucket/run/x.json") == fake_bucket / "bucket" / "run" / "x.json"
  assert str(paths.resolve("gs://bucket/run")) == "gs://bucket/run"  # Real URLs stay URLs (epath, as orbax).
  assert not paths.is_local(paths.resolve("gs://bucket/run"))
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("runs/a") == tmp_path / "runs" / "a"
  assert paths.is_url("fake://b/x") and not paths.is_url("/tmp/x")


def test_atomic_writes_create_parents_and_leave_no_temporary(fake_bucket):
  target = "fake://bucket/deep/dir/record.json"
  paths.write_text_atomic(target, json.dumps({"a": 1}))
  paths.write_text_atomic(target, json.dumps({"a": 2}))
  directory = fake_bucket / "bucket" / "deep" / "dir"
  assert os.listdir(directory) == ["record.json"]
  assert json.loads((directory / "record.json").read_text()) == {"a": 2}
  paths.write_npz_atomic("fake://bucket/stats.npz", {"mu": np.arange(3.0)})
  np.testing.assert_array_equal(np.load(fake_bucket / "bucket" / "stats.npz")["mu"], np.arange(3.0))


def test_object_store_branches_rewrite_instead_of_append_and_copy_instead_of_rename(fake_bucket, monkeypatch):
  monkeypatch.setattr(paths, "is_local", lambda path: False)  # As for gs://: no append, no rename.
  path = paths.resolve("fake://bucket/run/metrics.jsonl")
  writer = writers.JsonlWriter(path)
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_scalars(2, {"loss": 0.5})
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
  resumed = writers.JsonlWriter(path, drop_steps_after=1)  # A resumed run redoes step 2.
  resumed.write_scalars(2, {"loss": 0.4})
  assert [json.loads(l) for l in path.read_text().splitlines()] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.4}]
  source = paths.resolve("fake://bucket/run/checkpoints/7")
  (source / "state").mkdir(parents=True)
  (source / "state" / "data").write_bytes(b"\x01\x02")
  paths.move_tree(source, "fake://bucket/run/checkpoints_damaged/7.x")
  assert not source.exists()
  assert (fake_bucket / "bucket/run/checkpoints_damaged/7.x/state/data").read_bytes() == b"\x01\x02"


def test_unwritable_directories_are_one_line_errors(fake_bucket, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(UserError, match=r"--workdir '.*a_file' exists and is not a directory"):
    paths.ensure_writable_dir(str(blocker), "--workdir")
  with pytest.raises(UserError, match=r"--workdir '.*a_file/run' is not writable \("):
    paths.ensure_writable_dir(str(blocker / "run"), "--workdir")
  assert paths.ensure_writable_dir("fake://bucket/new", "--workdir") == fake_bucket / "bucket" / "new"
  assert os.listdir(fake_bucket / "bucket" / "new") == []  # The probe is gone.


def test_compilation_cache_defaults_under_the_cache_dir_and_turns_off(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import cli  # pylint: disable=g-import-not-at-top
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
  try:
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    assert cli.enable_compilation_cache(None) == str(tmp_path / "cache" / "jax_compilation_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache" / "jax_compilation_cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_own"))
    assert cli.enable_compilation_cache(None) == str(tmp_path / "jax_own")
    assert cli.enable_compilation_cache(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert cli.enable_compilation_cache("") is None and not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_enable_compilation_cache", before[1])
