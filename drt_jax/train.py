"""`python -m drt_jax.train --config configs/<name>.py --workdir DIR [--config.field=value]`.

Starts JAX's multi-process runtime when launched as one of several processes (launch/README.md),
parses and validates the config, builds or restores the state, then loops: step, log, eval,
checkpoint. A second run in the same DIR resumes at the exact next batch. A first run with
--config.train.init_from=OTHER_RUN_DIR starts from that run's newest params instead of random ones
(fine-tuning, or the next phase of a length curriculum: own data, fresh optimizer, step 0). Only
process 0 prints and writes metrics.
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np
import tqdm
from absl import app, flags
from ml_collections import config_flags

from drt_jax import cli
from drt_jax import config as config_lib
from drt_jax import distributed
from drt_jax import hardware
from drt_jax import metrics as metrics_lib
from drt_jax import train_lib
from drt_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, TensorBoard.")
_STEPS_THIS_RUN = flags.DEFINE_integer(
    "steps_this_run", None, "Stop (with a checkpoint) after this many steps; a later run resumes. "
    "For jobs with a wall-clock limit.")
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


def _check_same_experiment(config, workdir):
  """Refuses to resume a run folder written by a different model or data config."""
  path = os.path.join(workdir, "config.json")
  current = {k: config.to_dict()[k] for k in _FROZEN_SECTIONS}
  current = json.loads(json.dumps(current))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    for section in _FROZEN_SECTIONS:
      if saved.get(section) != current[section]:
        raise config_lib.ConfigError(
            f"{workdir} holds a run with a different {section} config ({saved.get(section)} vs "
            f"{current[section]}); use another --workdir")
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


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          steps_this_run: int | None = None, profile_steps: int = 0) -> dict:
  """Runs (or resumes) training to config.train.num_train_steps, or for `steps_this_run` steps;
  returns the metrics logged last. profile_steps > 0 traces that many steps, from this run's
  second, into <workdir>/profile."""
  distributed.check_same_config(config, workdir)  # first: validation errors then agree everywhere
  model_config = config_lib.validate(config)
  pipeline.validate_data_config(config.data)
  main_process = jax.process_index() == 0
  trainer = train_lib.Trainer(config, model_config, train_lib.make_mesh(config.mesh))
  manager = train_lib.checkpoint_manager(os.path.join(workdir, "checkpoints"),
                                         config.train.keep_checkpoints)
  init_from = config.train.init_from if manager.latest_step() is None else ""
  if init_from:  # before config.json is written, so that a refused source leaves none behind
    init_params, source = train_lib.load_params(init_from, trainer.abstract_state.params,
                                                config.model.to_dict())
  # The pipelines first: they check what only the data can tell (e.g. a task that does not fit
  # in data.seq_len), and a refused config must leave no config.json that blocks its correction.
  train_iter = pipeline.make_train_iterator(config, process_index=jax.process_index(),
                                            process_count=jax.process_count())
  eval_batches = pipeline.make_eval_batches(config, config.train.eval_batches,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count())
  _check_same_experiment(config, workdir)
  if manager.latest_step() is not None:
    state = train_lib.restore_checkpoint(manager, trainer.abstract_state, train_iter)
    _say(f"resumed from {workdir} at step {int(state.step)}" + (
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

  shape = (config.train.global_batch_size, config.data.seq_len)
  batch_spec = {"inputs": jax.ShapeDtypeStruct(shape, jax.numpy.int32,
                                               sharding=trainer.batch_sharding)}
  train_spec = dict(batch_spec)
  if config.data.task_fraction:
    train_spec["target_weights"] = jax.ShapeDtypeStruct(shape, jax.numpy.float32,
                                                        sharding=trainer.batch_sharding)
  compiled_step = trainer.compile_train_step(trainer.abstract_state, train_spec)
  compiled_eval = trainer.compile_eval_step(trainer.abstract_state.params, batch_spec)
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

  writer = metrics_lib.MetricWriter(workdir, enabled=main_process)
  tokens_per_step = config.train.global_batch_size * config.data.seq_len
  flops_per_step = config_lib.flops_per_token(model_config, config.data.seq_len) * tokens_per_step
  peak = hardware.peak_flops()
  bar = tqdm.tqdm(total=total_steps, initial=start, disable=not (progress and main_process),
                  unit="step", dynamic_ncols=True)
  last = {}
  pending = None  # metrics of the step before, logged one step late so the host never waits
  interval_start, interval_steps = time.perf_counter(), 0
  data_state = None
  try:
    for step in range(start, stop):
      if profile_steps and step == start + 1:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
      data_state = train_iter.get_state()  # to rewind to if Ctrl-C lands before the step is done
      batch = trainer.global_batch(next(train_iter))
      state, step_metrics = compiled_step(state, batch)
      data_state = None
      if profile_steps and step == start + profile_steps:
        jax.block_until_ready(step_metrics)
        jax.profiler.stop_trace()
        profile_steps = 0
      if pending is not None:
        last = _log_step(writer, bar, *pending)
      interval_steps += 1
      if (step + 1) % config.train.log_every == 0 or step + 1 == stop:
        jax.block_until_ready(step_metrics)
        elapsed = (time.perf_counter() - interval_start) / interval_steps
        timing = {"step_time_s": elapsed, "tokens_per_s": tokens_per_step / elapsed}
        if peak is not None:
          timing["mfu"] = flops_per_step / elapsed / (peak * jax.device_count())
        pending = (step + 1, step_metrics, timing)
        interval_start, interval_steps = time.perf_counter(), 0
      else:
        pending = None
      bar.update(1)
      if (step + 1) % config.train.checkpoint_every == 0 or step + 1 == stop:
        train_lib.save_checkpoint(manager, state, train_iter)
      if (step + 1) % config.train.eval_every == 0 or step + 1 == stop:
        if pending is not None:
          last, pending = _log_step(writer, bar, *pending), None
        eval_metrics = _evaluate(trainer, compiled_eval, state.params, eval_batches, task_steps)
        writer.write(step + 1, eval_metrics)
        last = {**last, **eval_metrics}
        _say(f"step {step + 1}: " + ", ".join(
            f"{name} {value:.4f}" for name, value in eval_metrics.items()
            if name == "eval_loss" or name.endswith("_accuracy")))
  except KeyboardInterrupt:
    if data_state is not None:
      train_iter.set_state(data_state)
    if not any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
      _say(f"interrupted: saving step {int(state.step)} before exiting")
      train_lib.save_checkpoint(manager, state, train_iter)
    raise
  finally:
    if profile_steps and stop > start + 1:  # the run ended inside the traced steps
      jax.profiler.stop_trace()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    bar.close()
  return last


def _spec_of(trainer, local_batch: dict) -> dict:
  """Global shapes of a host-local batch, sharded as trainer.global_batch shards it."""
  processes = jax.process_count()
  return {name: jax.ShapeDtypeStruct((value.shape[0] * processes,) + value.shape[1:],
                                     value.dtype, sharding=trainer.batch_sharding)
          for name, value in local_batch.items()}


def _log_step(writer, bar, step, step_metrics, timing):
  values = {name: float(value) for name, value in step_metrics.items() if name != "tokens"}
  values["perplexity"] = float(jax.numpy.exp(values["loss"]))
  values.update(timing)
  writer.write(step, values)
  bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
  return values


def main(argv):
  cli.start(argv)
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  try:
    distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train(_CONFIG.value, _WORKDIR.value, steps_this_run=_STEPS_THIS_RUN.value,
          profile_steps=_PROFILE_STEPS.value)
  except (config_lib.ConfigError, pipeline.DataError, distributed.LaunchError) as error:
    raise SystemExit(f"error: {error}") from None
  except KeyboardInterrupt:
    raise SystemExit(130) from None  # the loop has already saved and said so


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
