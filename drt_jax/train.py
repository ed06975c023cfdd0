"""`python -m drt_jax.train --config configs/<name>.py --workdir DIR [--config.field=value]`.

Starts JAX's multi-process runtime when launched as one of several processes (launch/README.md),
parses and validates the config, builds or restores the state, then loops: step, log, eval,
checkpoint. A second run in the same DIR resumes at the exact next batch. A first run with
--config.train.init_from=OTHER_RUN_DIR starts from that run's newest params instead of random ones
(fine-tuning, or the next phase of a length curriculum: own data, fresh optimizer, step 0). Only
process 0 prints, writes metrics and holds the run folder's lock (drt_jax/run_lock.py).

Nothing completed is lost on a stop: SIGTERM and SIGUSR1 (drt_jax/preemption.py) and Ctrl-C save
the step they stop at and write its metrics row; a resume skips checkpoints that do not restore and
drops the metrics rows after the one it resumes from; NaN/inf steps are skipped, and
train.max_nonfinite_steps of them in a row stop the run without saving anything after the last
good checkpoint.
"""

import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
import tqdm
from absl import app, flags
from ml_collections import config_flags

from drt_jax import banner
from drt_jax import cli
from drt_jax import config as config_lib
from drt_jax import distributed
from drt_jax import hardware
from drt_jax import metrics as metrics_lib
from drt_jax import preemption
from drt_jax import run_config
from drt_jax import run_lock
from drt_jax import train_lib
from drt_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, TensorBoard.")
_STEPS_THIS_RUN = flags.DEFINE_integer(
    "steps_this_run", None, "Stop (with a checkpoint) after this many steps; a later run resumes. "
    "For jobs with a wall-clock limit.")
LOG_FORMATS = ("auto", "bar", "lines")
_LOG = flags.DEFINE_enum(
    "log", "auto", LOG_FORMATS, "Progress output: a tqdm bar, a plain line per logged step (for "
    "log files), or auto: the bar on a terminal, lines otherwise.")
_PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps", 0, "Trace this many steps after the first of this run with jax.profiler into "
    "<workdir>/profile (bench/trace_top_ops.py prints its top ops); 0 = no trace.")
# Multi-process runs (launch/README.md): all three, or none inside SLURM's srun (SLURM_* is read).
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordination service.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")

# Sections whose change makes a checkpoint meaningless; train.* may change between restarts
# (train.init_from too: it is read only while the run folder holds no checkpoint).
_FROZEN_SECTIONS = ("model", "data", "seed")


def _check_same_experiment(config, workdir, has_checkpoint: bool):
  """Refuses to resume a run folder written by a different model or data config. A folder
  without a checkpoint holds no run yet (e.g. one refused before its first step): its config.json
  is replaced."""
  path = os.path.join(workdir, "config.json")
  current = {k: config.to_dict()[k] for k in _FROZEN_SECTIONS}
  current = json.loads(json.dumps(current))
  if has_checkpoint and os.path.exists(path):
    saved = run_config.flat(run_config.read_saved(path))
    for name, value in run_config.flat(current).items():
      if saved.get(name) != value:
        raise config_lib.ConfigError(
            f"{name}={value!r}: {workdir} holds a run trained with {name}={saved.get(name)!r}; "
            "use another --workdir")
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    # Written whole under another name, then renamed: another process may be reading it already.
    with open(path + ".tmp", "w") as f:
      json.dump(config.to_dict() | current, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def _say(message: str):
  """Prints on process 0 only, above the progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def _evaluate(trainer, compiled_eval, params, eval_batches, task_steps):
  """Held-out loss and, per mixed-in task, the teacher-forced answers' exact-match accuracy
  (every answer token right) and token accuracy. task_steps: {task: (compiled step, batch)}."""
  total = count = 0.0
  for batch in eval_batches:
    loss_sum, tokens = compiled_eval(params, trainer.global_batch(batch))
    total, count = total + float(loss_sum), count + float(tokens)
  loss = total / count
  metrics = {"eval_loss": loss, "eval_perplexity": float(jax.numpy.exp(loss))}
  for task, (step, batch) in task_steps.items():
    hits = np.asarray(step(params, trainer.global_batch(batch)))
    metrics[f"eval_{task}_accuracy"] = float(hits.min(axis=1).mean())
    metrics[f"eval_{task}_token_accuracy"] = float(hits.mean())
  return metrics


class NonFiniteError(RuntimeError):
  """The loss or gradient norm stayed NaN/inf for train.max_nonfinite_steps steps in a row, or
  the state itself holds NaN/inf; nothing of it was saved."""


class _Stopped(Exception):
  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


class _Progress:
  """The loop's output: metrics rows (metrics.jsonl, TensorBoard, W&B), the bar or plain lines,
  and the count of consecutive non-finite steps."""

  def __init__(self, config, writer, start, bar, lines, tokens_per_step, flops_per_step, peak):
    self.config, self.writer, self.bar, self.lines = config, writer, bar, lines
    self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak
    self.row_time, self.row_step = time.perf_counter(), start
    self.bad_steps = 0
    self.last = {}

  def step_done(self, step, step_metrics, *, row: bool):
    """Waits for `step`'s metrics; counts it if its loss or gradient norm is not finite (raising
    NonFiniteError at train.max_nonfinite_steps in a row); writes its row if `row`."""
    loss, grad_norm = float(step_metrics["loss"]), float(step_metrics["grad_norm"])
    self.bad_steps = 0 if np.isfinite(loss) and np.isfinite(grad_norm) else self.bad_steps + 1
    limit = self.config.train.max_nonfinite_steps
    if row or self.bad_steps >= limit:
      self._row(step, step_metrics)
    if self.bad_steps >= limit:
      raise NonFiniteError(
          f"stopped at step {step}: the loss or gradient norm was NaN/inf for {self.bad_steps} "
          f"steps in a row (train.max_nonfinite_steps={limit}; their updates were skipped)")

  def _row(self, step, step_metrics):
    values = {name: float(value) for name, value in step_metrics.items() if name != "tokens"}
    values["perplexity"] = float(np.exp(values["loss"])) if np.isfinite(values["loss"]) else np.inf
    now = time.perf_counter()
    elapsed = (now - self.row_time) / max(1, step - self.row_step)
    self.row_time, self.row_step = now, step
    values.update(step_time_s=elapsed, tokens_per_s=self.tokens_per_step / elapsed)
    if self.peak is not None:
      values["mfu"] = self.flops_per_step / elapsed / (self.peak * jax.device_count())
    self.writer.write(step, values)
    self.last = {**self.last, **values}
    self.bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
    if self.lines:
      extra = f", mfu {values['mfu']:.1%}" if "mfu" in values else ""
      _say(f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {step}/"
           f"{self.config.train.num_train_steps}: loss {values['loss']:.4f}, grad_norm "
           f"{values['grad_norm']:.3f}, lr {values['learning_rate']:.3g}, "
           f"{elapsed:.3f} s/step, {values['tokens_per_s']:,.0f} tokens/s{extra}")

  def restart_clock(self, step):
    self.row_time, self.row_step = time.perf_counter(), step

  def eval_done(self, step, eval_metrics):
    self.writer.write(step, eval_metrics)
    self.last = {**self.last, **eval_metrics}
    _say(f"step {step}: " + ", ".join(
        f"{name} {value:.4f}" for name, value in eval_metrics.items()
        if name == "eval_loss" or name.endswith("_accuracy")))


def _lock_run_folder(workdir: str) -> run_lock.RunLock:
  """Process 0 locks the run folder for the whole run; every process stops if it cannot."""
  lock, error = run_lock.RunLock(workdir), None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except run_lock.LockError as refused:
      error = refused
  if not distributed.all_true(error is None):
    if error is None:
      holder = run_lock.read_holder(workdir)
      error = run_lock.LockError(f"--workdir={workdir}: process 0 could not lock it" + (
          f" (in use by {run_lock.describe(holder)})" if holder else ""))
    raise error
  if lock.taken_over:
    _say(f"took over {lock.path}, left by a process that is gone "
         f"({run_lock.describe(lock.taken_over)})")
  return lock


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          steps_this_run: int | None = None, log: str = "auto",
          profile_steps: int = 0) -> dict:
  """Runs (or resumes) training to config.train.num_train_steps, or for `steps_this_run` steps;
  returns the metrics logged last. log: "bar" (tqdm), "lines" (a plain line per logged step) or
  "auto" (the bar on a terminal, lines otherwise); progress=False prints neither.
  profile_steps > 0 traces that many steps, from this run's second, into <workdir>/profile.

  SIGTERM or SIGUSR1 stops every process after the same step with a checkpoint of it (raising
  SystemExit(128 + signal)); Ctrl-C saves the step it interrupted and raises KeyboardInterrupt.
  """
  distributed.check_same_config(config, workdir)  # first: validation errors then agree everywhere
  if steps_this_run is not None and (isinstance(steps_this_run, bool) or steps_this_run < 1):
    raise config_lib.ConfigError(f"--steps_this_run={steps_this_run}: must be a positive integer "
                                 "(leave it out to train to train.num_train_steps)")
  _one_of_logs(log)
  model_config = config_lib.validate(config)
  pipeline.validate_data_config(config.data)
  if config.train.wandb_project:
    metrics_lib.import_wandb(config.train.wandb_project)
  main_process = jax.process_index() == 0
  trainer = train_lib.Trainer(config, model_config, train_lib.make_mesh(config.mesh))
  lock = _lock_run_folder(workdir)
  try:
    return _train_locked(config, workdir, trainer, model_config, progress=progress,
                         steps_this_run=steps_this_run, log=log, main_process=main_process,
                         profile_steps=profile_steps)
  finally:
    lock.release()


def _one_of_logs(log):
  if log not in LOG_FORMATS:
    raise config_lib.ConfigError(f"--log={log!r}: must be one of " + ", ".join(LOG_FORMATS))


def _train_locked(config, workdir, trainer, model_config, *, progress, steps_this_run, log,
                  main_process, profile_steps):
  manager = train_lib.checkpoint_manager(os.path.join(workdir, "checkpoints"),
                                         config.train.keep_checkpoints)
  has_checkpoint = bool(manager.all_steps())
  init_from = config.train.init_from if not has_checkpoint else ""
  if init_from:  # before config.json is written, so that a refused source leaves none behind
    init_params, source = train_lib.load_params(init_from, trainer.abstract_state.params,
                                                config.model.to_dict())
  # The pipelines first: they check what only the data can tell (e.g. a task that does not fit
  # in data.seq_len).
  train_iter = pipeline.make_train_iterator(config, process_index=jax.process_index(),
                                            process_count=jax.process_count())
  eval_batches = pipeline.make_eval_batches(config, config.train.eval_batches,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count())
  _check_same_experiment(config, workdir, has_checkpoint)
  state, restored_step = None, None
  if has_checkpoint:
    state, restored_step = train_lib.restore_newest(
        manager, trainer.abstract_state, train_iter, say=_say, all_agree=distributed.all_true)
  if state is not None:
    _say(f"resumed from {workdir} at step {restored_step}" + (
        " (train.init_from is read only by a run's first start)" if config.train.init_from else ""))
  elif init_from:
    state = trainer.state_from_params(init_params)
    _say(f"params from {source} (train.init_from); step 0, fresh optimizer state")
  else:
    state = trainer.init_state(config.seed)
  start = int(state.step)
  total_steps = config.train.num_train_steps
  if start >= total_steps:
    _say(f"{workdir} is already at step {start} >= train.num_train_steps={total_steps}; nothing "
         "to do (raise --config.train.num_train_steps to continue)")
    manager.close()
    return {}
  stop = total_steps if steps_this_run is None else min(total_steps, start + steps_this_run)
  if main_process:
    for line in banner.lines(config, trainer.mesh, trainer.abstract_state.params, workdir, start):
      print(line, flush=True)

  shape = (config.train.global_batch_size, config.data.seq_len)
  train_spec = {"inputs": jax.ShapeDtypeStruct(shape, jax.numpy.int32,
                                               sharding=trainer.batch_sharding)}
  if config.data.task_fraction:
    train_spec["target_weights"] = jax.ShapeDtypeStruct(shape, jax.numpy.float32,
                                                        sharding=trainer.batch_sharding)
  compiled_step = trainer.compile_train_step(trainer.abstract_state, train_spec)
  compiled_eval = trainer.compile_eval_step(trainer.abstract_state.params,
                                            _spec_of(trainer, eval_batches[0]))
  finite_check = trainer.compile_finite_check(trainer.abstract_state)
  task_steps = {
      task: (trainer.compile_answer_step(trainer.abstract_state.params, _spec_of(trainer, batch)),
             batch)
      for task, batch in pipeline.make_task_eval_batches(
          config, process_index=jax.process_index(),
          process_count=jax.process_count()).items()}
  distributed.barrier("compiled")
  if main_process:
    memory = compiled_step.memory_analysis()
    if memory is not None:
      print(f"train step memory per device: arguments {memory.argument_size_in_bytes / 2**20:.1f} "
            f"MiB, temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB")

  train_config = config.train
  writer = metrics_lib.MetricWriter(workdir, enabled=main_process, resume_step=start,
                                    config=config.to_dict(),
                                    wandb_project=train_config.wandb_project,
                                    wandb_mode=train_config.wandb_mode)
  tokens_per_step = train_config.global_batch_size * config.data.seq_len
  flops_per_step = config_lib.flops_per_token(model_config, config.data.seq_len) * tokens_per_step
  use_bar = log == "bar" or (log == "auto" and sys.stdout.isatty())
  bar = tqdm.tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True,
                  disable=not (progress and main_process and use_bar))
  out = _Progress(config, writer, start, bar, progress and not use_bar, tokens_per_step,
                  flops_per_step, hardware.peak_flops())
  saved = [restored_step]  # the newest step saved (or restored): the last good checkpoint

  def save(state):
    if not bool(finite_check(state)):
      raise NonFiniteError(f"step {int(state.step)}: the state holds NaN/inf, not saved")
    train_lib.save_checkpoint(manager, state, train_iter)
    saved[0] = int(state.step)

  def due(step, every):
    return step % every == 0 or step == stop

  pending = None  # (step, metrics) of a step dispatched but not looked at yet
  evaluated = None  # the step of the newest eval
  data_state = None
  stop_signal = preemption.StopSignal()
  tracing = False
  try:
    with stop_signal:
      for step in range(start + 1, stop + 1):
        if profile_steps and step == start + 2:
          jax.profiler.start_trace(os.path.join(workdir, "profile"))
          tracing = True
        data_state = train_iter.get_state()  # to rewind to if Ctrl-C lands before the step is done
        batch = trainer.global_batch(next(train_iter))
        state, step_metrics = compiled_step(state, batch)
        data_state = None
        if tracing and step == start + 1 + profile_steps:
          jax.block_until_ready(step_metrics)
          jax.profiler.stop_trace()
          tracing = False
        if pending is not None:  # the step before: the device is busy with this one meanwhile
          out.step_done(*pending, row=due(pending[0], train_config.log_every))
        pending = (step, step_metrics)
        signum = stop_signal.poll()
        checkpoint = due(step, train_config.checkpoint_every) or signum
        evaluate = due(step, train_config.eval_every)
        if checkpoint or evaluate:
          out.step_done(*pending, row=due(step, train_config.log_every) or signum)
          pending = None
        if checkpoint:
          save(state)
          train_lib.check_saves(manager, step=saved[0])
        if evaluate:
          out.eval_done(step, _evaluate(trainer, compiled_eval, state.params, eval_batches,
                                        task_steps))
          evaluated = step
        if checkpoint or evaluate:
          out.restart_clock(step)  # step times leave out saving and evaluating
        if signum:
          raise _Stopped(signum)
      if pending is not None:
        out.step_done(*pending, row=True)
  except _Stopped as stopped:
    _say(f"stopped by {preemption.name(stopped.signum)}: saved step {saved[0]}; the same command "
         "resumes from it")
    raise SystemExit(128 + stopped.signum) from None
  except NonFiniteError as error:
    kept = (f"the last good checkpoint, step {saved[0]}, is kept" if saved[0] is not None
            else "no checkpoint was saved")
    raise NonFiniteError(f"{error}; {kept} in {manager.directory}") from None
  except KeyboardInterrupt:
    if data_state is not None:
      train_iter.set_state(data_state)
    if not any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
      step = int(state.step)
      if pending is not None and pending[0] == step:
        out.step_done(*pending, row=True)
      if step % train_config.eval_every == 0 and evaluated != step:
        out.eval_done(step, _evaluate(trainer, compiled_eval, state.params, eval_batches,
                                      task_steps))
      if saved[0] != step:
        _say(f"interrupted: saving step {step} before exiting")
        save(state)
    raise
  finally:
    if tracing:  # the run ended inside the traced steps
      jax.profiler.stop_trace()
    try:
      train_lib.check_saves(manager, wait=True, step=saved[0])
    finally:
      manager.close()
      writer.close()
      bar.close()
  return out.last


def _spec_of(trainer, local_batch: dict) -> dict:
  """Global shapes of a host-local batch, sharded as trainer.global_batch shards it."""
  processes = jax.process_count()
  return {name: jax.ShapeDtypeStruct((value.shape[0] * processes,) + value.shape[1:],
                                     value.dtype, sharding=trainer.batch_sharding)
          for name, value in local_batch.items()}


def main(argv):
  cli.start(argv)
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  try:
    distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train(_CONFIG.value, _WORKDIR.value, steps_this_run=_STEPS_THIS_RUN.value, log=_LOG.value,
          profile_steps=_PROFILE_STEPS.value)
  except (config_lib.ConfigError, pipeline.DataError, distributed.LaunchError, run_lock.LockError,
          train_lib.CheckpointError, train_lib.CheckpointSaveError, NonFiniteError,
          metrics_lib.WandbMissingError) as error:
    raise SystemExit(f"error: {error}") from None
  except KeyboardInterrupt:
    raise SystemExit(130) from None  # the loop has already saved and said so


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
