"""Restarts that lose nothing: signals (SIGTERM, SIGUSR1, Ctrl-C) and kill -9 mid-run, the
run-folder lock, broken and unwritable checkpoints, NaN/inf stops, metrics rows, the banner,
TensorBoard scalars and the one-line errors of a refused start. Runs go through subprocesses (a
real process receiving a real signal); the run config is tests/test_train.py's short run, so they
load its compiled programs from the compilation cache."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from drt_jax import banner as banner_lib
from drt_jax import config as config_lib
from drt_jax import metrics as metrics_lib
from drt_jax import run_lock
from drt_jax import train as train_main
from tests.test_train import REPO, _assert_same_curve, _short_run_config

TIMEOUT_S = 300


def run_config(**train_overrides):
  config = _short_run_config(steps=20)
  for name, value in train_overrides.items():
    config.train[name] = value
  return config


# Runs train() once per leg of a plan in one process. A leg acts at the N-th call of
# Trainer.global_batch (one per step; eval batches count too): it sends itself a signal, or writes
# a marker file and waits to be killed ("block").
_LEGS = """
import json, os, signal, sys, time
from drt_jax import distributed, train as train_main, train_lib
from tests.test_train_restarts import run_config

workdir, plan = sys.argv[1], json.loads(sys.argv[2])
# A process started with SIGINT ignored (as the test runner's workers may be) keeps it ignored:
# Ctrl-C at a terminal raises KeyboardInterrupt, so the legs do too.
signal.signal(signal.SIGINT, signal.default_int_handler)
if len(sys.argv) > 3:
  distributed.initialize(f"127.0.0.1:{sys.argv[3]}", 2, int(sys.argv[4]))
original = train_lib.Trainer.global_batch
for leg in plan:
  calls = [0]
  def global_batch(self, local_batch, leg=leg, calls=calls):
    calls[0] += 1
    if calls[0] == leg["at"]:
      if leg["do"] == "block":
        open(leg["marker"], "w").close()
        time.sleep(600)
      os.kill(os.getpid(), getattr(signal, leg["do"]))
    return original(self, local_batch)
  train_lib.Trainer.global_batch = global_batch
  config = run_config(**leg.get("train", {}))
  if len(sys.argv) > 3:  # tests/test_distributed.py's mesh: its compiled programs are cached
    config.mesh.data, config.mesh.fsdp = 2, 4
  try:
    train_main.train(config, workdir, log="lines")
    code = 0
  except SystemExit as stop:
    code = stop.code
  except KeyboardInterrupt:
    code = "KeyboardInterrupt"
  print("LEG", leg["do"], code, flush=True)
"""


def _env(devices=None):
  env = dict(os.environ, PYTHONPATH=REPO)
  if devices is not None:
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _legs(workdir, plan, *extra):
  return [sys.executable, "-c", _LEGS, str(workdir), json.dumps(plan), *map(str, extra)]


def _run(command, env=None, **kwargs):
  return subprocess.run(command, cwd=REPO, env=env or _env(), capture_output=True, text=True,
                        timeout=TIMEOUT_S, **kwargs)


def _cli(workdir, *flags, env=None):
  return _run([sys.executable, "-m", "drt_jax.train", "--config", "configs/tiny.py",
               "--workdir", str(workdir), *flags], env=env)


def _last_line(result):
  return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""


def _rows(workdir, key="loss"):
  return [(r["step"], r[key]) for r in metrics_lib.read_metrics(str(workdir)) if key in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted 20-step run: (its folder, {step: loss}, {step: eval_loss})."""
  workdir = tmp_path_factory.mktemp("straight")
  train_main.train(run_config(), str(workdir), progress=False)
  return workdir, dict(_rows(workdir)), dict(_rows(workdir, "eval_loss"))


def test_signals_and_ctrl_c_save_the_step_they_stop_at_and_resume_exactly(tmp_path, straight):
  """SIGTERM during step 7, Ctrl-C during the eval of step 10 and SIGUSR1 during step 13, each in
  a process of its own; then a plain resume to step 20. Every stop saves its step and writes its
  row; the curve is the uninterrupted one; every step has one row."""
  workdir = tmp_path / "run"
  result = _run(_legs(workdir, [{"at": 7, "do": "SIGTERM"}]))
  assert "LEG SIGTERM 143" in result.stdout, result.stdout + result.stderr
  assert "stopped by SIGTERM: saved step 7" in result.stdout
  # The banner: platform, mesh, parameters, tokens per step, commit, config hash.
  banner = result.stdout
  assert "devices: 1 x cpu (platform cpu), 1 process(es)" in banner, banner
  assert "mesh: data=1 x fsdp=1 x tensor=1" in banner
  assert " parameters; 336 tokens per step (8 x 42); steps 0 -> 20" in banner
  assert f"config {banner_lib.config_hash(run_config())}" in banner
  assert banner.startswith("drt-jax ")
  # Plain lines, no carriage returns, when stdout is not a terminal.
  assert "\r" not in result.stdout + result.stderr and "step 5/20: loss " in result.stdout
  assert sorted(os.listdir(workdir / "checkpoints")) == ["7"]
  assert [s for s, _ in _rows(workdir)] == [5, 7]

  for plan, expected in [([{"at": 4, "do": "SIGINT"}], "LEG SIGINT KeyboardInterrupt"),
                         ([{"at": 3, "do": "SIGUSR1"}], "LEG SIGUSR1 138")]:
    result = _run(_legs(workdir, plan))
    assert expected in result.stdout, result.stdout + result.stderr
  assert "resumed from" in result.stdout and "stopped by SIGUSR1: saved step 13" in result.stdout
  assert sorted(map(int, os.listdir(workdir / "checkpoints"))) == [10, 13]

  train_main.train(run_config(), str(workdir), progress=False)
  steps = [s for s, _ in _rows(workdir)]
  assert steps == [5, 7, 10, 13, 15, 20], steps  # once each, the interrupted ones included
  _, losses, eval_losses = straight
  _assert_same_curve({s: v for s, v in _rows(workdir) if s % 5 == 0}, losses, [5, 10, 15, 20])
  # The eval of step 10 that Ctrl-C interrupted was run before exiting.
  _assert_same_curve(dict(_rows(workdir, "eval_loss")), eval_losses, [10, 20])
  assert all("time" in r for r in metrics_lib.read_metrics(str(workdir)))

  # TensorBoard holds plain scalars, one per step, the same as metrics.jsonl; and the config.
  events = EventAccumulator(str(workdir / "tensorboard"))
  events.Reload()
  scalars = events.Scalars("loss")
  assert [e.step for e in scalars] == steps
  np.testing.assert_allclose([e.value for e in scalars], [v for _, v in _rows(workdir)],
                             rtol=1e-6)
  assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_second_writer_kill_9_and_a_stale_lock(tmp_path, straight):
  """A run blocked in step 13 (after its step-10 checkpoint) holds the folder: a second run gets
  one line naming it. Killed with -9, it leaves its lock; the next run on this host takes it
  over, resumes at 10 and writes each step once."""
  workdir, marker = tmp_path / "run", tmp_path / "blocked"
  first = subprocess.Popen(_legs(workdir, [{"at": 13, "do": "block", "marker": str(marker)}]),
                           cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
    assert marker.exists(), "the first run never reached step 13"
    second = _cli(workdir)
    assert second.returncode == 1
    assert _last_line(second) == (
        f"error: --workdir={workdir} is in use by another run (PID {first.pid} on host "
        f"{socket.gethostname()}, since {run_lock.read_holder(str(workdir))['since']}): one run "
        f"writes a run folder at a time; if that process is gone, remove {workdir}/lock"), (
            second.stderr)
  finally:
    first.kill()
    first.wait()
  assert [s for s, _ in _rows(workdir)] == [5, 10]
  train_main.train(run_config(), str(workdir), progress=False)
  _, losses, _ = straight
  _assert_same_curve(dict(_rows(workdir)), losses, [5, 10, 15, 20])
  assert not (workdir / "lock").exists()  # released at the end


def test_two_processes_stop_together_on_a_signal_to_one(tmp_path):
  """Process 1 alone gets SIGTERM during step 4: both processes stop after the same step, and
  that step's checkpoint holds both processes' parts."""
  workdir = tmp_path / "run"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  processes = [subprocess.Popen(
      _legs(workdir, [{"at": 4 if i == 1 else 10**6, "do": "SIGTERM"}], port, i), cwd=REPO,
      env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = []
  try:
    for p in processes:
      outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  for output in outputs:
    assert "LEG SIGTERM 143" in output, output
  assert "stopped by SIGTERM: saved step 5" in outputs[0], outputs[0]
  assert os.listdir(workdir / "checkpoints") == ["5"]
  assert sorted(os.listdir(workdir / "checkpoints" / "5" / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert outputs[0].count("devices: 8 x cpu") == 1 and "devices:" not in outputs[1]


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, straight):
  """From the step-10 checkpoint with a learning rate of 1e30: the gradients are NaN/inf from
  step 12 on, so the run stops at step 13 (train.max_nonfinite_steps=2); step 10 stays newest."""
  workdir = tmp_path / "run"
  shutil.copytree(straight[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / "20")
  result = _cli(workdir, *_flags(), "--config.train.learning_rate=1e30",
                "--config.train.max_nonfinite_steps=2")
  assert result.returncode == 1, result.stderr
  assert _last_line(result) == (
      "error: stopped at step 13: the loss or gradient norm was NaN/inf for 2 steps in a row "
      "(train.max_nonfinite_steps=2; their updates were skipped); the last good checkpoint, "
      f"step 10, is kept in {workdir}/checkpoints"), result.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]
  last = metrics_lib.read_metrics(str(workdir))[-1]
  # The stopping step's row, NaN as null (JSON has no NaN); apply_if_finite skipped 12 and 13.
  assert last["step"] == 13 and last["grad_norm"] is None and last["skipped_steps"] == 2, last


def _flags():
  """run_config() as command-line overrides of configs/tiny.py."""
  flags, defaults = [], config_lib.load_config_file(os.path.join(REPO, "configs", "tiny.py"))
  for section in ("model", "data", "train"):
    for name, value in run_config()[section].items():
      if defaults[section][name] != value:
        flags.append(f"--config.{section}.{name}={value}")
  return flags


def test_broken_newest_steps_are_skipped_with_one_line_each(tmp_path, straight):
  """Empty (30), partial (40: no state) and truncated (50) step folders above a good step 20."""
  workdir = tmp_path / "run"
  shutil.copytree(straight[0], workdir)
  checkpoints = workdir / "checkpoints"
  (checkpoints / "30").mkdir()
  shutil.copytree(checkpoints / "20", checkpoints / "40")
  shutil.rmtree(checkpoints / "40" / "state")
  shutil.copytree(checkpoints / "20", checkpoints / "50")
  for root, _, files in os.walk(checkpoints / "50" / "state"):
    for name in files:
      if os.path.basename(root) == "d":
        os.truncate(os.path.join(root, name), 10)
  result = _cli(workdir, *_flags())
  assert result.returncode == 0, result.stderr
  skipped = [line for line in result.stdout.splitlines() if "does not restore, skipped" in line]
  assert [line.split()[2] for line in skipped] == ["50", "40", "30"], result.stdout
  assert "Error reading" in skipped[0] and "'state' was not found" not in skipped[0]
  assert "Item \"state\" was not found" in skipped[1]
  assert f"resumed from {workdir} at step 20" in result.stdout
  assert len(result.stdout.splitlines()) + len(result.stderr.splitlines()) < 20
  assert sorted(os.listdir(checkpoints)) == ["10", "20"]
  assert sorted(os.listdir(workdir / "unrestorable")) == ["30", "40", "50"]


def _make_read_only(path):
  """chmod for a normal user; root ignores it, so the immutable attribute then (or skip)."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    return lambda: os.chmod(path, 0o755)
  if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
    pytest.skip("cannot make a folder read-only here (root without chattr)")
  return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_checkpoint_that_cannot_be_written_fails_at_once_and_keeps_the_last(tmp_path,
                                                                              straight):
  workdir = tmp_path / "run"
  shutil.copytree(straight[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / "20")
  undo = _make_read_only(workdir / "checkpoints")
  try:
    started = time.monotonic()
    result = _cli(workdir, *_flags())
    took = time.monotonic() - started
  finally:
    undo()
  assert result.returncode == 1
  assert _last_line(result).startswith(
      f"error: could not save the checkpoint of step 20 in {workdir}/checkpoints (PermissionError"
      ), result.stderr
  assert _last_line(result).endswith("; step 10 is the newest checkpoint kept")
  assert took < 150, took  # orbax's background directory creation used to hang for 300 s
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]


def test_refused_starts_give_one_line_and_leave_nothing_behind(tmp_path):
  """Each refused before anything is compiled; none leaves a run folder behind."""
  (tmp_path / "file").write_text("")
  cases = [
      (["--config.train.learning_rate=inf"],
       "error: train.learning_rate=inf: must be a finite number", None),
      (["--steps_this_run=0"], "error: --steps_this_run=0: must be a positive integer (leave it "
       "out to train to train.num_train_steps)", None),
      (["--config.model.topkk=3"],
       "error: --config.model.topkk=3: no config field model.topkk (did you mean model.topk?)",
       None),
      (["--config.modle.topk=3"],
       "error: --config.modle.topk=3: no config section modle (did you mean model?)", None),
      (["--config.mesh.tensor=3", "--config.mesh.data=1", "--config.train.global_batch_size=3"],
       "error: mesh.tensor=3: cannot split model.vocab_size=259 (the 'vocab' axis of param "
       "['embed']['embedding']) into 3 equal parts; choose mesh sizes that divide it", 3),
  ]
  processes = []
  for i, (flags, _, devices) in enumerate(cases):
    command = [sys.executable, "-m", "drt_jax.train", "--config", "configs/tiny.py",
               "--workdir", str(tmp_path / f"run{i}"), *flags]
    processes.append(subprocess.Popen(command, cwd=REPO, env=_env(devices), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  processes.append(subprocess.Popen(
      [sys.executable, "-m", "drt_jax.train", "--config", "configs/tiny.py", "--workdir",
       str(tmp_path / "file" / "run")], cwd=REPO, env=_env(), text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  cases.append(([], f"error: --workdir={tmp_path}/file/run: cannot create it (Not a directory: "
                f"{tmp_path}/file/run)", None))
  for (flags, expected, _), process in zip(cases, processes):
    _, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == expected, (flags, stderr)
  assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize("field,value,needle", [
    ("model.init_std", float("inf"), "model.init_std=inf: must be a finite number"),
    ("train.b1", float("nan"), "train.b1=nan: must be a finite number"),
    ("train.max_nonfinite_steps", 0, "train.max_nonfinite_steps=0: must be a positive integer"),
    ("train.wandb_mode", "sometimes", "train.wandb_mode='sometimes': must be one of 'online'"),
])
def test_non_finite_and_new_fields_are_validated(field, value, needle):
  config = run_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config)
  assert needle in str(error.value)


def test_steps_this_run_must_be_positive(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"--steps_this_run=-1: must be a positive"):
    train_main.train(run_config(), str(tmp_path / "run"), steps_this_run=-1)
  assert not (tmp_path / "run").exists()


def test_a_folder_without_a_checkpoint_takes_the_corrected_config(tmp_path, straight):
  """What a run that failed before its first step leaves (its config.json, no checkpoints/)
  does not refuse the corrected command; a folder that holds checkpoints still does."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  other = run_config()
  other.model.d_model = 64
  (workdir / "config.json").write_text(json.dumps(other.to_dict(), default=str))
  train_main.train(run_config(), str(workdir), progress=False, steps_this_run=1)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]
  with pytest.raises(config_lib.ConfigError,
                     match="model.d_model=64: .* holds a run trained with model.d_model=32"):
    train_main.train(other, str(straight[0]), progress=False)


def test_a_lock_of_a_live_process_is_never_taken(tmp_path):
  lock = run_lock.RunLock(str(tmp_path))
  lock.acquire()
  with pytest.raises(run_lock.LockError, match=f"PID {os.getpid()} on host"):
    run_lock.RunLock(str(tmp_path)).acquire()
  lock.release()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
  taker = run_lock.RunLock(str(tmp_path))
  taker.acquire()
  assert taker.taken_over["pid"] == dead.pid
  assert run_lock.read_holder(str(tmp_path))["pid"] == os.getpid()
  taker.release()
  (tmp_path / "lock").write_text(json.dumps({"host": "elsewhere", "pid": dead.pid}))
  with pytest.raises(run_lock.LockError, match="on host elsewhere"):
    run_lock.RunLock(str(tmp_path)).acquire()


def test_wandb_asked_for_without_the_package_is_one_line(tmp_path):
  try:
    import wandb  # noqa: F401
    pytest.skip("wandb is installed")
  except ImportError:
    pass
  config = run_config(wandb_project="drt")
  with pytest.raises(metrics_lib.WandbMissingError, match=r"train.wandb_project='drt': needs "
                     r"the wandb package, which is not installed \(pip install wandb\)"):
    train_main.train(config, str(tmp_path / "run"), progress=False)
