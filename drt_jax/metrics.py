"""Metric sinks: DIR/metrics.jsonl (one JSON object per line) and TensorBoard event files.

TensorBoard's own writer is used (not clu/tf.summary) so nothing on the training path imports
tensorflow. Only the main process writes.
"""

import json
import os

from tensorboard.summary import Writer


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
      self._tensorboard = Writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict):
    """Appends {"step": step, **values}; floats only besides step."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    for name, value in values.items():
      self._tensorboard.add_scalar(name, float(value), step=int(step))
    self._tensorboard.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
  """All records of DIR/metrics.jsonl, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
