"""Metric sinks: DIR/metrics.jsonl (one JSON object per line), TensorBoard event files and,
optionally, Weights & Biases.

TensorBoard's own event writer is used (not clu/tf.summary) so nothing on the training path
imports tensorflow; values are written as plain scalars (`simple_value`), which every TensorBoard
reader shows as scalars, and the config as hparams. Only the main process writes.
"""

import json
import math
import os
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from drt_jax import run_config

METRICS_FILE = "metrics.jsonl"


class WandbMissingError(ImportError):
  """W&B logging was asked for but the wandb package is not installed."""


def import_wandb(project: str):
  """The wandb module, imported only when a run asks for it (train.wandb_project)."""
  try:
    import wandb
  except ImportError:
    raise WandbMissingError(f"train.wandb_project={project!r}: needs the wandb package, which is "
                            "not installed (pip install wandb), or set train.wandb_project=''")
  return wandb


def truncate_metrics(workdir: str, last_step: int):
  """Drops the rows of DIR/metrics.jsonl after `last_step`: a run resumed from the checkpoint of
  `last_step` writes the later steps again, and each step must appear once. Atomic (rename)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      continue  # a line cut short by a kill
    if step <= last_step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def _hparams(config: dict) -> dict:
  """TensorBoard hparams take scalars and strings: other values (tuples, lists) as JSON."""
  return {name: value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)
          for name, value in run_config.flat(config).items()}


class MetricWriter:
  """Appends rows {"step", "time" (Unix seconds), **values} to DIR/metrics.jsonl and the same
  values to TensorBoard (and W&B when `wandb_project` is set)."""

  def __init__(self, workdir: str, enabled: bool = True, *, resume_step: int = 0,
               config: dict | None = None, wandb_project: str = "", wandb_mode: str = "online"):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    truncate_metrics(workdir, resume_step)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)
    self._tensorboard = EventFileWriter(os.path.join(workdir, "tensorboard"))
    if resume_step:
      # Readers then drop what an earlier start wrote after the checkpoint resumed from.
      self._tensorboard.add_event(event_pb2.Event(
          wall_time=time.time(), step=resume_step + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    flat_config = _hparams(config or {})
    if flat_config:
      self._tensorboard.add_event(event_pb2.Event(
          wall_time=time.time(), step=resume_step,
          summary=hparams_summary.hparams_pb(flat_config)))
    self._wandb = None
    if wandb_project:
      wandb = import_wandb(wandb_project)
      # resume="allow" with the folder's own id: a resumed run continues the same W&B run.
      self._wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=workdir,
                               config=flat_config, id=_wandb_id(workdir), resume="allow")

  def write(self, step: int, values: dict):
    """Appends {"step": step, "time": now, **values}; floats only besides step."""
    if not self.enabled:
      return
    now = time.time()
    values = {k: float(v) for k, v in values.items()}
    # JSON has no NaN or inf: such a value is null in metrics.jsonl (TensorBoard keeps it).
    row = {k: v if math.isfinite(v) else None for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": round(now, 3), **row}) + "\n")
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=name, simple_value=value)
                                         for name, value in values.items()])
    self._tensorboard.add_event(event_pb2.Event(wall_time=now, step=int(step), summary=summary))
    self._tensorboard.flush()
    if self._wandb is not None:
      self._wandb.log(values, step=int(step))

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
      if self._wandb is not None:
        self._wandb.finish()


def _wandb_id(workdir: str) -> str:
  """A W&B run id kept in DIR/wandb_id, made on the folder's first run."""
  path = os.path.join(workdir, "wandb_id")
  if not os.path.exists(path):
    with open(path, "w") as f:
      f.write(os.urandom(8).hex())
  with open(path) as f:
    return f.read().strip()


def read_metrics(workdir: str) -> list[dict]:
  """All records of DIR/metrics.jsonl, in order."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]
