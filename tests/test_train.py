"""Training end to end on CPU: learning, resumption, starting from another run's params, sharding
equivalence, bad input."""

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from drt_jax import config as config_lib
from drt_jax import metrics as metrics_lib
from drt_jax import train as train_main
from drt_jax.data import DataError
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


def _learning_config():
  """A model large enough to learn in 150 steps, on sequences that hold a passkey sample."""
  config = _short_run_config(steps=150, d_model=64, num_heads=4, num_kv_heads=4, mlp_dim=128)
  config.data.seq_len = 7 * 16
  config.train.learning_rate = 3e-3
  config.train.eval_every = 150
  config.data.task_fraction = 0.25  # also reports the held-out passkey answers' accuracy
  return config


def test_loss_falls_on_tiny(tmp_path):
  config = _learning_config()
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


def test_a_partial_checkpoint_is_never_restored(tmp_path, straight_run):
  # The straight run's config (its compiled programs), stopped at 10 and resumed for 5 steps.
  config = _short_run_config(steps=20)
  train_main.train(config, str(tmp_path), progress=False, steps_this_run=10)
  # What a run killed mid-save leaves behind: orbax's temporary folder for a later step (restored,
  # step 20 would leave nothing to do).
  partial = tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp-1234" / "state"
  partial.mkdir(parents=True)
  (partial / "garbage").write_text("half-written")
  train_main.train(config, str(tmp_path), progress=False, steps_this_run=5)
  assert _train_losses(str(tmp_path))[-1][0] == 15


@pytest.fixture(scope="module")
def phase_one(tmp_path_factory):
  """Phase 1 of a length curriculum: 10 steps on 42-token sequences, checkpointed at step 10."""
  workdir = str(tmp_path_factory.mktemp("phase_one"))
  train_main.train(_short_run_config(steps=10), workdir, progress=False)
  return workdir


def _phase_two_config(source):
  """Phase 2: a new run on longer sequences, from phase 1's params; retrieving fewer chunks
  (model.topk) changes no param, so it may differ."""
  config = _short_run_config(steps=10, topk=2)
  config.data.seq_len = 7 * 8
  config.train.init_from = source
  return config


def _saved_state(workdir, step):
  """The TrainState of a checkpoint as nested dicts of arrays."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  # As host numpy arrays: a test has no sharding to restore into.
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          manager.item_metadata(step)["state"])
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(restore_args=as_numpy))).state
  manager.close()
  return state


def _adam_counts(state):
  return {int(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
          if "'count'" in jax.tree_util.keystr(path)}


def test_init_from_starts_step_0_with_the_source_params_and_a_fresh_optimizer(
    tmp_path, phase_one, capsys):
  workdir = str(tmp_path / "phase_two")
  train_main.train(_phase_two_config(phase_one), workdir, progress=False, steps_this_run=1)
  assert f"params from {phase_one}/checkpoints step 10" in capsys.readouterr().out
  source, new = _saved_state(phase_one, 10), _saved_state(workdir, 1)
  # The schedule's step-0 learning rate is 0 (warm-up from 0), so that one step left the params
  # as they were loaded; continuing phase 1's schedule at step 10 would have moved them.
  jax.tree.map(np.testing.assert_array_equal, new["params"], source["params"])
  assert int(new["step"]) == 1
  assert _adam_counts(source) == {10} and _adam_counts(new) == {1}


def test_a_restart_resumes_its_own_checkpoint_not_init_from(tmp_path, phase_one, capsys):
  config = _phase_two_config(phase_one)
  workdir = str(tmp_path / "phase_two")
  train_main.train(config, workdir, progress=False, steps_this_run=1)
  capsys.readouterr()
  train_main.train(config, workdir, progress=False, steps_this_run=4)
  assert f"resumed from {workdir} at step 1" in capsys.readouterr().out
  new = _saved_state(workdir, 5)  # 1 + 4: restarting from phase 1's params would stop at 4
  assert int(new["step"]) == 5 and _adam_counts(new) == {5}
  losses = _train_losses(workdir)
  assert [step for step, _ in losses] == [1, 5] and np.isfinite([loss for _, loss in losses]).all()
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), new["params"],
                         _saved_state(phase_one, 10)["params"])
  assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("source,model_overrides,needles", [
    ("missing", {}, ["no such folder"]),
    ("empty", {}, ["no checkpoint"]),
    ("phase_one", {"d_model": 64}, ["that run has model.d_model=32, this one model.d_model=64"]),
    ("phase_one", {"use_alibi": False}, ["model.use_alibi=True", "model.use_alibi=False"]),
])
def test_init_from_refuses_a_missing_or_different_source(tmp_path, phase_one, source,
                                                         model_overrides, needles):
  (tmp_path / "empty").mkdir()
  path = phase_one if source == "phase_one" else str(tmp_path / source)
  config = _short_run_config(steps=10, **model_overrides)
  config.train.init_from = path
  workdir = tmp_path / "phase_two"
  with pytest.raises(config_lib.ConfigError) as error:
    train_main.train(config, str(workdir), progress=False)
  for needle in [f"train.init_from={path!r}", *needles]:
    assert needle in str(error.value), str(error.value)
  assert not (workdir / "config.json").exists()  # refused before anything of the run was written


_SHARDED_SCRIPT = """
import jax
from drt_jax import train as train_main
from drt_jax.data import DataError
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
  script = _SHARDED_SCRIPT.format(data=data, fsdp=fsdp, workdir=sharded)
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
    ("model.impl", "cuda", "'auto', 'mosaic', 'triton', 'xla'"),
    ("model.impl", "pallas", "the former 'pallas' is 'auto'"),
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


def test_a_config_refused_by_its_data_leaves_the_run_folder_usable(tmp_path):
  """A task that does not fit in data.seq_len is refused before config.json is written, so the
  corrected config can then start in the same --workdir. (test_loss_falls_on_tiny's config, so
  the corrected run reuses its compiled programs.)"""
  config = _learning_config()
  config.data.seq_len = 7 * 8  # shorter than a passkey sample
  with pytest.raises(DataError, match="too short for task 'passkey'"):
    train_main.train(config, str(tmp_path), progress=False)
  assert not (tmp_path / "config.json").exists()
  config.data.seq_len = 7 * 16
  train_main.train(config, str(tmp_path), progress=False, steps_this_run=2)
  assert "2" in os.listdir(tmp_path / "checkpoints")
