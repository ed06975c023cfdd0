"""A run folder describes itself: eval and generate rebuild the config a run was trained with from
its config.json (train.py writes it), and check every change made on top of it.

`--checkpoint RUN_DIR` alone loads RUN_DIR/config.json; `--config RUN_DIR/config.json` does too;
`--config configs/x.py` starts from that file instead. `--config.section.field=value` overrides
apply on top either way. The result is compared with the run's config.json field by field: every
changed field is printed, and a change to model.* (what was trained: shapes, arch, retrieval,
chunk length, window, top-k, ...) is an error naming the field unless `--allow_change` names it.
How the model is computed (FREE_FIELDS) may change freely.

This file is also the loader config_flags runs for a saved config (`get_config`), so a saved
config.json takes the same override syntax as a configs/*.py file.
"""

import json
import math
import os
import subprocess

import ml_collections

# The model fields that change how a trained model is computed, not what it computes: kernels,
# compute dtype, rematerialisation, and Gumbel noise (training only).
FREE_FIELDS = ("model.impl", "model.dtype", "model.remat", "model.gumbel")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunConfigError(ValueError):
  """A run folder's config that is missing or was changed where it may not be."""


def _run_folder(checkpoint: str) -> str:
  """The run folder (train.py's --workdir) of a run folder, its checkpoints/ or a step folder."""
  path = os.path.abspath(checkpoint)
  if os.path.basename(path).isdigit():  # <run>/checkpoints/<step>
    path = os.path.dirname(path)
  if os.path.basename(path) == "checkpoints":
    path = os.path.dirname(path)
  return path


def saved_config_path(checkpoint: str) -> str:
  return os.path.join(_run_folder(checkpoint), "config.json")


def with_defaults(saved: dict, defaults: dict | None = None) -> dict:
  """A saved config.json's values with every field it lacks (a field added to configs/base.py
  after the run was written) at its default, so older run folders still load and compare."""
  if defaults is None:
    from configs import base
    defaults = as_json(base.get_config())
  out = dict(saved)
  for name, value in defaults.items():
    if name not in out:
      out[name] = value
    elif isinstance(value, dict) and isinstance(out[name], dict):
      out[name] = with_defaults(out[name], value)
  return out


# model.impl values older runs saved, by the value that now means the same execution choice:
# "pallas" ran the fastest kernels of the device, which "auto" picks (attention_impls.py). impl
# does not change what was trained (FREE_FIELDS), so a saved run simply runs on today's choice.
RENAMED_IMPLS = {"pallas": "auto"}


def read_saved(file: str) -> dict:
  """The values of a config.json, with defaults for the fields it lacks (with_defaults) and
  model.impl renamed where RENAMED_IMPLS says."""
  with open(file) as f:
    values = with_defaults(json.load(f))
  model = values["model"]
  model["impl"] = RENAMED_IMPLS.get(model["impl"], model["impl"])
  return values


def load_saved(path: str) -> ml_collections.ConfigDict:
  """A config.json file, or the one of a run folder / checkpoint path, as a ConfigDict."""
  file = path if path.endswith(".json") else saved_config_path(path)
  if not os.path.isfile(file):
    raise RunConfigError(f"{path!r}: no config.json there (train.py writes it into the run "
                         "folder); pass --config configs/<name>.py")
  values = read_saved(file)
  values["model"]["decoder_layers"] = tuple(values["model"]["decoder_layers"])
  values["logical_axis_rules"] = tuple(
      (name, tuple(axes) if isinstance(axes, list) else axes)
      for name, axes in values.get("logical_axis_rules", ()))
  return ml_collections.ConfigDict(values)


def get_config(path: str) -> ml_collections.ConfigDict:
  """config_flags' entry point: `--config <this file>:<run folder or config.json>`."""
  return load_saved(path)


def with_run_config(argv: list[str]) -> list[str]:
  """argv with `--config` pointed at this loader where it names a config.json, or where it is
  absent and `--checkpoint` names a run: config_flags then loads the saved config and applies
  `--config.field=value` overrides to it."""
  argv = list(argv)
  loader = os.path.abspath(__file__)
  value_of = {}
  for i, arg in enumerate(argv):
    for name in ("config", "checkpoint"):
      if arg == f"--{name}" and i + 1 < len(argv):
        value_of[name] = (i, 2, argv[i + 1])
      elif arg.startswith(f"--{name}="):
        value_of[name] = (i, 1, arg.split("=", 1)[1])
  if "config" in value_of:
    i, width, value = value_of["config"]
    if value.endswith(".json"):
      argv[i:i + width] = [f"--config={loader}:{value}"]
  elif "checkpoint" in value_of:
    argv.insert(1, f"--config={loader}:{value_of['checkpoint'][2]}")
  return argv


def flat(values, prefix="") -> dict:
  """Nested config values -> {"section.field": value}."""
  out = {}
  for name, value in values.items():
    if isinstance(value, dict):
      out.update(flat(value, f"{prefix}{name}."))
    else:
      out[prefix + name] = value
  return out


def as_json(config: ml_collections.ConfigDict) -> dict:
  """The config as config.json holds it (tuples as lists)."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def changes_from_run(config: ml_collections.ConfigDict, checkpoint: str,
                     allow_change=()) -> list[str]:
  """Lines "field: trained value -> this value" for every field that differs from the run's
  config.json (none if the run has no config.json). Raises RunConfigError for the first model
  field changed that is neither in FREE_FIELDS nor in allow_change."""
  path = saved_config_path(checkpoint)
  if not os.path.isfile(path):
    return [f"(no config.json in {os.path.dirname(path)}: the config is not checked against "
            "the run's)"]
  saved = flat(read_saved(path))
  current = flat(as_json(config))
  allowed = set(FREE_FIELDS) | set(allow_change)
  lines = []
  for name in sorted(set(saved) | set(current)):
    before, after = saved.get(name, "(absent)"), current.get(name, "(absent)")
    if before == after:
      continue
    if name.startswith("model.") and name not in allowed:
      raise RunConfigError(
          f"{name}={after!r}: the run was trained with {name}={before!r}; evaluating a trained "
          f"model with another {name} needs --allow_change={name}")
    lines.append(f"{name}: {before!r} (trained) -> {after!r}")
  return lines


def check_allow_change(names) -> tuple[str, ...]:
  """--allow_change values: model fields, e.g. model.topk."""
  names = tuple(n.strip() for n in names if n.strip())
  for name in names:
    if not name.startswith("model."):
      raise RunConfigError(f"--allow_change={name!r}: must name a model field, e.g. model.topk "
                           "(other sections may change without it)")
  return names


def code_commit() -> str | None:
  """The commit of the code running (with "-dirty" if tracked files differ), or None outside a
  git checkout."""
  def git(*args):
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                          timeout=10)
  try:
    head = git("rev-parse", "HEAD")
    if head.returncode:
      return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return head.stdout.strip() + ("-dirty" if dirty else "")


def json_safe(value):
  """value with every NaN / inf float replaced by None (valid JSON: null)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value
