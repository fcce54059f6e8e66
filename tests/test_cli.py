"""Bad input on the command line gets a one-line error naming the bad value, not a traceback."""

import json
import os
import subprocess
import sys

import pytest

from diffusion_jax import config as config_lib
from diffusion_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stderr.strip().splitlines()


def _assert_one_line_error(returncode, stderr_lines, *fragments):
  assert returncode == 2, stderr_lines
  errors = [l for l in stderr_lines if l.startswith("error: ")]
  assert len(errors) == 1, stderr_lines
  assert not any("Traceback" in l for l in stderr_lines), stderr_lines
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


def test_unknown_config_key_on_the_command_line(tmp_path):
  rc, err = _run("diffusion_jax.main", "--config=configs/digits.py", f"--workdir={tmp_path}",
                 "--config.optimizer.learning_rat=0.1")
  _assert_one_line_error(rc, err, "unknown config key 'optimizer.learning_rat'")


def test_missing_config_file(tmp_path):
  rc, err = _run("diffusion_jax.main", "--config=configs/nope.py", f"--workdir={tmp_path}")
  _assert_one_line_error(rc, err, "config file 'configs/nope.py' does not exist")


def test_sample_with_a_missing_workdir(tmp_path):
  rc, err = _run("diffusion_jax.sample", f"--workdir={tmp_path / 'missing'}")
  _assert_one_line_error(rc, err, "workdir", "missing", "does not exist")


def test_sample_with_an_over_long_prompt(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    f.write(config_lib.to_json(config_lib.get_default_config()))
  rc, err = _run("diffusion_jax.sample", f"--workdir={tmp_path}", "--prompts=" + "seven " * 10)
  _assert_one_line_error(rc, err, "is 59 bytes long; text.max_length=32 allows at most 30 bytes")


def test_validate_names_unknown_keys_and_bad_values():
  c = config_lib.get_default_config()
  c.unet_channels = 3
  with pytest.raises(UserError, match=r"unknown config key\(s\) \['unet_channels'\]"):
    config_lib.validate(c)
  c = config_lib.get_default_config()
  c.diffusion.prediction_type = "score"
  with pytest.raises(UserError, match=r"config.diffusion.prediction_type='score' is not allowed; choose one of \['eps', 'v', 'x0'\]"):
    config_lib.validate(c)


def test_config_json_round_trip():
  c = config_lib.get_default_config()
  again = config_lib.from_json(config_lib.to_json(c))
  assert again.to_dict() == c.to_dict()
  assert json.loads(config_lib.to_json(c))["batch_size"] == c.batch_size


def test_unusable_paths_are_clear_errors(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  _assert_one_line_error(*_run("diffusion_jax.sample", f"--workdir={a_file}"), "a_file", "is not a directory")
  _assert_one_line_error(*_run("diffusion_jax.main", "--config=configs/smoke.py", f"--workdir={a_file}"),
                         "a_file", "exists and is not a directory")
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text("{not json")
  _assert_one_line_error(*_run("diffusion_jax.evaluate", f"--workdir={broken}"), "cannot read", "config.json")
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  (untrained / "config.json").write_text(config_lib.to_json(config_lib.get_default_config()))
  _assert_one_line_error(*_run("diffusion_jax.export", f"--workdir={untrained}", f"--out={tmp_path / 'out'}"),
                         "no checkpoint in", "train first")
