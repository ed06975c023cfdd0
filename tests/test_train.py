"""Training end to end on CPU: learning, resumption, sharding equivalence, bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest

from drt_jax import config as config_lib
from drt_jax import metrics as metrics_lib
from drt_jax import train as train_main
from tests.helpers import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _short_run_config(steps=20, **model_overrides):
  config = small_config(**model_overrides)
  train = config.train
  train.global_batch_size = 8
  train.num_train_steps = steps
  train.warmup_steps = 5
  train.log_every = 5
  train.eval_every = 10
  train.eval_batches = 2
  train.checkpoint_every = 10
  config.data.cache_dir = ""
  return config


def _train_losses(workdir):
  return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(workdir) if "loss" in r]


def test_loss_falls_on_tiny(tmp_path):
  config = _short_run_config(steps=150, d_model=64, num_heads=4, num_kv_heads=4, mlp_dim=128)
  config.data.seq_len = 7 * 16
  config.train.learning_rate = 3e-3
  config.train.eval_every = 150
  config.data.task_fraction = 0.25  # also reports the held-out passkey answers' accuracy
  train_main.train(config, str(tmp_path), progress=False)
  records = metrics_lib.read_metrics(str(tmp_path))
  first = records[0]["loss"]
  final = [r for r in records if "eval_loss" in r][-1]
  final_eval = final["eval_loss"]
  assert 0 <= final["eval_passkey_accuracy"] <= final["eval_passkey_token_accuracy"] <= 1
  assert first > 4.5, first  # ~ln(257) at init
  assert final_eval < first - 1.5, (first, final_eval)
  assert os.listdir(tmp_path / "tensorboard")
  assert "150" in os.listdir(tmp_path / "checkpoints")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """A 20-step run without interruption: the curve the other runs must reproduce."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train_main.train(_short_run_config(steps=20), workdir, progress=False)
  return dict(_train_losses(workdir))


def _assert_same_curve(got, expected, steps):
  assert sorted(got) == steps, sorted(got)
  for step in steps:
    np.testing.assert_allclose(got[step], expected[step], rtol=1e-5, err_msg=f"step {step}")


def test_resume_reproduces_the_uninterrupted_run(tmp_path, straight_run):
  config = _short_run_config(steps=20)
  interrupted = str(tmp_path / "interrupted")
  train_main.train(config, interrupted, progress=False, steps_this_run=10)
  assert _train_losses(interrupted)[-1][0] == 10
  train_main.train(config, interrupted, progress=False)
  _assert_same_curve(dict(_train_losses(interrupted)), straight_run, [5, 10, 15, 20])


def test_a_partial_checkpoint_is_never_restored(tmp_path):
  config = _short_run_config(steps=10)
  train_main.train(config, str(tmp_path), progress=False)
  # What a run killed mid-save leaves behind: orbax's temporary folder for a later step.
  partial = tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp-1234" / "state"
  partial.mkdir(parents=True)
  (partial / "garbage").write_text("half-written")
  config.train.num_train_steps = 15
  train_main.train(config, str(tmp_path), progress=False)
  assert _train_losses(str(tmp_path))[-1][0] == 15


_SHARDED_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import jax
from drt_jax import train as train_main
from tests.test_train import _short_run_config
assert jax.device_count() == 8, jax.devices()
config = _short_run_config(steps=20)
config.mesh.data, config.mesh.fsdp = {data}, {fsdp}
train_main.train(config, {workdir!r}, progress=False, steps_this_run=10)
"""


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2)])
def test_eight_fake_devices_match_one_device(tmp_path, straight_run, data, fsdp):
  sharded = str(tmp_path / "sharded")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  script = _SHARDED_SCRIPT.format(repo=REPO, data=data, fsdp=fsdp, workdir=sharded)
  subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=REPO, timeout=600)
  _assert_same_curve(dict(_train_losses(sharded)), straight_run, [5, 10])


@pytest.mark.parametrize("field,value,needle", [
    ("model.topk", 0, "model.topk=0"),
    ("model.d_model", -8, "model.d_model=-8"),
    ("model.num_heads", 3, "must divide model.d_model"),
    ("model.num_kv_heads", 3, "model.num_kv_heads=3"),
    ("model.decoder_layers", (2,), "model.decoder_layers"),
    ("model.window", -1, "model.window=-1"),
    ("model.retrieval", "oracle", "'learned', 'random'"),
    ("model.residual", "post", "model.residual='post'"),
    ("model.impl", "cuda", "'xla', 'pallas'"),
    ("data.seq_len", 100, "multiple of model.chunk_len=7"),
    ("train.grad_accum_steps", 3, "must divide train.global_batch_size"),
    ("train.warmup_steps", 10**9, "train.warmup_steps"),
    ("train.lr_floor", 2.0, "train.lr_floor=2.0"),
    ("mesh.data", 0, "mesh.data=0"),
])
def test_invalid_config_fields_are_named(field, value, needle):
  config = small_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=None) as error:
    config_lib.validate(config)
  assert needle in str(error.value), str(error.value)


def test_pallas_needs_a_kernel_chunk_size():
  config = small_config(impl="pallas")
  with pytest.raises(config_lib.ConfigError, match="chunk_len \\+ 1 must be one of 32, 64, 128"):
    config_lib.validate(config)


def _cli(tmp_path, *overrides):
  command = [sys.executable, "-m", "drt_jax.train", "--config", "configs/tiny.py",
             "--workdir", str(tmp_path / "run"), *overrides]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_rejects_a_misspelled_field(tmp_path):
  result = _cli(tmp_path, "--config.model.topkk=3")
  assert result.returncode != 0
  assert "topkk" in result.stderr


def test_cli_gives_one_line_for_bad_values_and_missing_data(tmp_path):
  result = _cli(tmp_path, "--config.model.topk=0")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == "error: model.topk=0: must be a positive integer"
  result = _cli(tmp_path, "--config.data.source=text", "--config.data.path=/no/such/folder")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "/no/such/folder" in result.stderr.strip().splitlines()[-1]
