"""Multi-process training on CPU (2 processes x 4 fake devices over 127.0.0.1) against one process,
checkpoints across process counts, FSDP shardings, and how flags and SLURM start a process group."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from drt_jax import distributed
from drt_jax import metrics as metrics_lib
from drt_jax import train as train_main
from tests.test_train import REPO, _assert_same_curve, _short_run_config, _train_losses

LEG = 3  # steps per run: every run stops (with an eval and a checkpoint) after LEG steps
TIMEOUT_S = 300  # per group of processes; a hang fails the test instead of stalling CI


def run_config():
  """tests/test_train.py's short run (so one-device runs reuse its compiled programs from the
  compilation cache), its loss logged at every step."""
  config = _short_run_config()
  config.train.log_every = 1
  return config


def _write_config_file(tmp_path):
  """run_config() as a `--config` file, written out as literals: a file importing the tests would
  import drt_jax.train a second time beside `python -m drt_jax.train` (absl: flags defined twice)."""
  path = tmp_path / "run_config.py"
  path.write_text("import ml_collections\n\n\ndef get_config():\n"
                  f"  return ml_collections.ConfigDict({run_config().to_dict()!r})\n")
  return path

# Process i of 2: trains LEG steps through the library API (distributed.initialize + train), then
# writes where its shards of the parameters and Adam moments live.
_WORKER = """
import json, sys
import jax
from drt_jax import config as config_lib, distributed, train as train_main, train_lib
from tests.test_distributed import LEG, run_config

port, process_id, workdir, out = sys.argv[1:]
distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
config = run_config()
config.mesh.data, config.mesh.fsdp = 2, 4
train_main.train(config, workdir, progress=False, steps_this_run=LEG)
trainer = train_lib.Trainer(config, config_lib.validate(config), train_lib.make_mesh(config.mesh))
state = trainer.init_state(config.seed)
leaves = {}
for path, leaf in jax.tree_util.tree_leaves_with_path(state):
  if leaf.ndim:
    leaves[jax.tree_util.keystr(path)] = {
        "shape": leaf.shape, "spec": [str(axis) for axis in leaf.sharding.spec],
        "shards": [[[s.start or 0, s.stop or dim] for s, dim in zip(shard.index, leaf.shape)]
                   for shard in leaf.addressable_shards]}
with open(out, "w") as f:
  json.dump(leaves, f)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices_per_process=None):
  """The subprocesses' environment: os.environ (with conftest.py's compilation cache) as it is
  for one device, so one-device runs hit the programs this pytest process compiles."""
  env = dict(os.environ, PYTHON=sys.executable)
  if devices_per_process is not None:
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  return env


def _run_group(commands, env, *, check=True):
  """Runs the commands as concurrent processes until all exit or TIMEOUT_S passes.

  check=True fails the test (with every process's last output lines) at the first non-zero exit,
  after stopping the rest: they would otherwise wait for the dead one in a collective. Returns
  [(returncode, output)], returncode None for a process that had to be stopped.
  """
  logs = [tempfile.TemporaryFile("w+") for _ in commands]
  processes = [subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                text=True) for command, log in zip(commands, logs)]
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
      if check and any(p.poll() not in (None, 0) for p in processes):
        break
      time.sleep(0.2)
  finally:
    returncodes = [p.poll() for p in processes]
    for p in processes:
      if p.poll() is None:
        p.terminate()  # the launcher stops its children on SIGTERM
        try:
          p.wait(10)
        except subprocess.TimeoutExpired:
          p.kill()
          p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  if check and returncodes != [0] * len(commands):
    report = []
    for command, returncode, output in zip(commands, returncodes, outputs):
      status = "stopped (timeout or another failed)" if returncode is None else f"exit {returncode}"
      shown = " ".join(arg if len(arg) < 100 else "<script>" for arg in command)
      report += [f"--- {shown}: {status}; last lines:", *output.splitlines()[-25:]]
    pytest.fail("\n".join(["processes failed", *report]), pytrace=False)
  return list(zip(returncodes, outputs))


def _train_flags(config_file, workdir, *flags):
  return ["--config", str(config_file), "--workdir", str(workdir), f"--steps_this_run={LEG}", *flags]


def _train_command(config_file, workdir, *flags):
  return [sys.executable, "-m", "drt_jax.train", *_train_flags(config_file, workdir, *flags)]


def test_two_processes_match_one_and_checkpoints_move_between_process_counts(tmp_path):
  """R: one process, one device, 0 -> LEG -> 2 LEG (the reference curve).
  A: two processes (data=2 x fsdp=4) 0 -> LEG, then one process LEG -> 2 LEG.
  C: R's checkpoint at LEG, then two processes LEG -> 2 LEG through launch/local_multiprocess.sh.
  Every loss and eval loss of A and C must be R's (f32, rtol 1e-5).

  The one-process, one-device legs (R's two, A's second) run in this pytest process, as
  tests/test_train.py's resumes do: a subprocess would add a JAX start-up and only repeat what
  the two-process legs and tests/test_train_restarts.py check of the command line."""
  config_file = _write_config_file(tmp_path)
  two = _env(4)
  ref, a, c = tmp_path / "R", tmp_path / "A", tmp_path / "C"

  train_main.train(run_config(), str(ref), progress=False, steps_this_run=LEG)
  shutil.copytree(ref, c)
  train_main.train(run_config(), str(ref), progress=False, steps_this_run=LEG)

  port, shardings = _free_port(), [tmp_path / f"shardings_{i}.json" for i in range(2)]
  _run_group([[sys.executable, "-c", _WORKER, str(port), str(i), str(a), str(shardings[i])]
              for i in range(2)], two)
  train_main.train(run_config(), str(a), progress=False, steps_this_run=LEG)

  log_dir = tmp_path / "launcher_logs"
  (_, launcher_output), = _run_group(
      [["bash", "launch/local_multiprocess.sh", "2",
        *_train_flags(config_file, c, "--config.mesh.data=2", "--config.mesh.fsdp=4")]],
      dict(two, LOG_DIR=str(log_dir)))

  expected = dict(_train_losses(str(ref)))
  expected_eval = {r["step"]: r["eval_loss"]
                   for r in metrics_lib.read_metrics(str(ref)) if "eval_loss" in r}
  assert sorted(expected_eval) == [LEG, 2 * LEG]
  steps = list(range(1, 2 * LEG + 1))
  for run in (a, c):
    records = metrics_lib.read_metrics(str(run))
    # Only process 0 writes metrics: one record per logged step, none doubled.
    assert [r["step"] for r in records if "loss" in r] == steps, run
    _assert_same_curve(dict(_train_losses(str(run))), expected, steps)
    _assert_same_curve({r["step"]: r["eval_loss"] for r in records if "eval_loss" in r},
                       expected_eval, [LEG, 2 * LEG])

  # Only process 0 prints.
  assert launcher_output.count(f"resumed from {c} at step {LEG}") == 1, launcher_output
  other = (log_dir / "process_1.log").read_text()
  assert "resumed from" not in other and "eval_loss" not in other, other

  for path in shardings:
    _assert_fsdp_sharded(json.loads(path.read_text()))


def _assert_fsdp_sharded(leaves):
  """Mesh (data=2, fsdp=4, tensor=1) with configs/base.py's rules ("embed" -> fsdp): a leaf with an
  embed axis is split in 4 along it across this process's 4 devices (fsdp inside a process, data
  across processes); other axes are whole. Parameters and both Adam moments alike."""
  embedding = leaves[".params['embed']['embedding']"]
  assert embedding["spec"] == ["tensor", "fsdp"], embedding
  assert embedding["shards"] == [[[0, 259], [8 * j, 8 * j + 8]] for j in range(4)], embedding
  sharded = [path for path, leaf in leaves.items() if "fsdp" in leaf["spec"]]
  for path, leaf in leaves.items():
    for axis, (dim, name) in enumerate(zip(leaf["shape"], leaf["spec"] + ["None"] * 8)):
      pieces = sorted({tuple(shard[axis]) for shard in leaf["shards"]})
      if name == "fsdp":
        assert pieces == [(dim // 4 * j, dim // 4 * (j + 1)) for j in range(4)], (path, pieces)
      else:
        assert pieces == [(0, dim)], (path, axis, pieces)
  for suffix in (".params['embed']['embedding']", ".mu['embed']['embedding']",
                 ".nu['embed']['embedding']"):
    assert any(path.endswith(suffix) for path in sharded), (suffix, sorted(leaves))
  kernels = [path for path in leaves if path.startswith(".params") and path.endswith("['kernel']")]
  assert kernels and all(path in sharded for path in kernels), kernels


def test_processes_with_different_configs_stop_with_one_line(tmp_path):
  config_file = _write_config_file(tmp_path)
  port = _free_port()
  flags = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  results = _run_group(
      [_train_command(config_file, tmp_path / "run", *flags, "--process_id=0"),
       _train_command(config_file, tmp_path / "run", *flags, "--process_id=1",
                      "--config.train.learning_rate=0.1")],
      _env(), check=False)
  for returncode, output in results:
    assert returncode not in (0, None), output
    assert output.strip().splitlines()[-1] == (
        "error: processes [1] run a different train than process 0: start every process with the "
        "same flags"), output


# ---------------------------------------------------------------- process groups from flags / SLURM

def _slurm(**overrides):
  """srun's variables for task 5 of 16 (2 nodes x 8 tasks), job 1234."""
  env = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "5",
         "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "gpu[007-008]",
         "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "1234"}
  env.update(overrides)
  return {k: v for k, v in env.items() if v is not None}


def test_no_flags_and_no_slurm_step_is_a_single_process_run():
  assert distributed.resolve(environ={}) is None
  # A batch script itself: SLURM variables of the allocation, but no srun step.
  assert distributed.resolve(environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "16",
                                      "SLURM_PROCID": "0"}) is None


def test_explicit_flags():
  group = distributed.resolve("10.0.0.1:1234", 4, 3, environ={})
  assert group == distributed.ProcessGroup("10.0.0.1:1234", 4, 3, None)


@pytest.mark.parametrize("args,needle", [
    (("h:1", None, 0), "--num_processes missing"),
    ((None, 2, None), "--coordinator_address, --process_id missing"),
    (("h:1", 2, 2), "--process_id=2: must be in [0, --num_processes=2)"),
    (("h", 2, 1), "--coordinator_address='h': must be host:port"),
])
def test_bad_flags_are_named(args, needle):
  with pytest.raises(distributed.LaunchError) as error:
    distributed.resolve(*args, environ={})
  assert needle in str(error.value)


def test_slurm_one_task_per_gpu():
  group = distributed.resolve(environ=_slurm())
  assert group == distributed.ProcessGroup(f"gpu007:{61440 + 1234}", 16, 5, (5,))
  # SLURM bound one GPU to the task: it is the only one the process sees.
  assert distributed.resolve(environ=_slurm(CUDA_VISIBLE_DEVICES="5")).local_device_ids is None


def test_slurm_one_task_per_host_takes_all_its_gpus():
  env = _slurm(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NODEID="1",
               SLURM_STEP_TASKS_PER_NODE="1(x2)", JAX_COORDINATOR_PORT="5000",
               CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  assert distributed.resolve(environ=env) == distributed.ProcessGroup("gpu007:5000", 2, 1, None)


def test_flags_override_slurm_and_missing_slurm_variables_are_named():
  assert distributed.resolve("login1:999", environ=_slurm()).coordinator_address == "login1:999"
  with pytest.raises(distributed.LaunchError, match="SLURM_STEP_NODELIST unset"):
    distributed.resolve(environ=_slurm(SLURM_STEP_NODELIST=None))


@pytest.mark.parametrize("nodelist,host", [
    ("node001", "node001"), ("node001,host2", "node001"), ("gpu[003-007,012],cpu1", "gpu003"),
    ("node[12,7-9]", "node12"), ("rack-[1-4]-ib", "rack-1-ib"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
  assert distributed.first_host(nodelist) == host


def test_tasks_per_node():
  assert distributed.tasks_per_node("8(x2),4,1(x3)") == [8, 8, 4, 1, 1, 1]
  with pytest.raises(distributed.LaunchError, match="cannot read '8x2'"):
    distributed.tasks_per_node("8x2")
