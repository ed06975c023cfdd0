"""The start-up summary a run prints first: what it runs on and what it runs, so that a silent
CPU fallback, a wrong mesh or an unexpected config shows in the first lines of a job's log."""

import hashlib
import json
import os
import subprocess

import jax
import ml_collections
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
  """The repository's commit ("+dirty" with uncommitted changes), or "unknown" outside git."""
  try:
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], text=True,
                          capture_output=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                           text=True, capture_output=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head + ("+dirty" if dirty else "")


def config_hash(config: ml_collections.ConfigDict) -> str:
  """12 hex digits of the config's SHA-256 (its JSON, keys sorted): equal configs, equal hashes."""
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def lines(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, params, workdir: str,
          start: int) -> list[str]:
  """The banner. params: the (abstract) parameter tree; start: the step the run starts at."""
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  train = config.train
  tokens = train.global_batch_size * config.data.seq_len
  return [
      f"drt-jax {commit()}, config {config_hash(config)}, run folder {workdir}",
      f"devices: {len(devices)} x {'/'.join(kinds)} (platform {jax.default_backend()}), "
      f"{jax.process_count()} process(es), {jax.local_device_count()} on this one",
      "mesh: " + " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items()),
      f"model: {config.model.arch}, {count:,} parameters; {tokens:,} tokens per step "
      f"({train.global_batch_size} x {config.data.seq_len}); steps {start} -> "
      f"{train.num_train_steps}",
  ]
