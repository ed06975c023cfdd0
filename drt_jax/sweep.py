"""`python -m drt_jax.sweep --config C --name NAME [--grid field=v1,v2 ...]
[--variant 'label: field=v ...' ...] [--set field=value ...] [--runs_dir runs] [--dry_run]
[--index I]`

Trains one run per combination of the grids (and variants), each in its own folder
RUNS_DIR/NAME/<label>, through `python -m drt_jax.train` in a subprocess (a fresh process per run:
its device memory is freed and a failure is its own). A second invocation resumes unfinished runs
from their newest checkpoint and skips finished ones, so a crashed or preempted sweep is restarted
with the same command; `--index I` runs combination I alone (a SLURM array task,
launch/sweep.sbatch).

- `--grid model.topk=4,8`: one axis of the product; values split at top-level commas, so
  `--grid "model.decoder_layers=(2,2),(2,1,1)"` has two values. Values are parsed as
  `--config.field=value` parses them (a Python literal, else a string).
- `--variant "swa: model.arch=swa model.decoder_layers=(4,)"`: a named set of fields
  (space-separated assignments, shell-quoted where needed); the variants form one more axis, for
  comparisons whose members differ in several fields at once (an architecture and its layers).
- `--set field=value`: applied to every run, before the grid and variant fields.

Every combination's config is built and validated (config.validate, the data config) before any
run starts, so a misspelled field or a bad value fails in one line. The folder label joins the
variant label and `field=value` per grid axis (the field's last name, or its whole path when two
axes share a last name). RUNS_DIR/NAME/sweep.json records every run's assignments (a later
invocation may add runs, never change one's fields); each run folder gets
`overrides.txt`, the `--config.field=value` flags it was trained with (one per line), so evaluation
can rebuild the same config: `eval --config C $(cat RUN/overrides.txt) --checkpoint RUN`.
Evaluation results belong in RUN/eval/<name>.json, where `drt_jax.compare` finds them.
"""

import argparse
import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time

import ml_collections

from drt_jax import config as config_lib
from drt_jax.data import DataError
from drt_jax.data import pipeline

EVAL_DIR = "eval"  # RUN/eval/*.json: evaluation results of a run (drt_jax.compare reads them)


class SweepError(ValueError):
  """A sweep argument that cannot work; the message names it."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One combination: its index, folder label and the assignments applied to the base config."""
  index: int
  label: str
  assignments: tuple[str, ...]  # "section.field=value", in the order they are applied


def split_values(text: str) -> list[str]:
  """"4,8" -> ["4", "8"]; commas inside brackets or quotes do not split: "(2,2),(3,)" has two."""
  values, depth, quote, current = [], 0, None, ""
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      values.append(current)
      current = ""
      continue
    current += char
  values.append(current)
  return values


def _parse_grid(text: str) -> tuple[str, list[str]]:
  field, sep, values = text.partition("=")
  if not sep or not field:
    raise SweepError(f"--grid {text!r}: expected field=value1,value2,...")
  values = split_values(values)
  if any(not v.strip() for v in values):
    raise SweepError(f"--grid {text!r}: an empty value (values are comma-separated)")
  if len(set(values)) != len(values):
    raise SweepError(f"--grid {text!r}: a value is repeated")
  return field, values


def _parse_variant(text: str) -> tuple[str, list[str]]:
  label, sep, body = text.partition(":")
  label = label.strip()
  if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label):
    raise SweepError(f"--variant {text!r}: expected 'label: field=value ...' with a label of "
                     "letters, digits, '.', '_' or '-'")
  assignments = shlex.split(body)
  if any("=" not in a for a in assignments):
    raise SweepError(f"--variant {text!r}: every assignment must be field=value")
  return label, assignments


def _value_label(value: str) -> str:
  text = re.sub(r"[()\[\]'\" ]", "", value).replace(",", "-")
  return re.sub(r"[^A-Za-z0-9._=+-]", "_", text) or "empty"


def plan(grids: list[str], variants: list[str], sets: list[str]) -> list[Run]:
  """The runs of a sweep, in index order: variants vary slowest, the last grid fastest."""
  axes = [_parse_grid(g) for g in grids]
  fields = [field for field, _ in axes]
  if len(set(fields)) != len(fields):
    raise SweepError(f"--grid: a field is given twice ({fields})")
  last = [f.rsplit(".", 1)[-1] for f in fields]
  names = [n if last.count(n) == 1 else f.replace(".", "-") for f, n in zip(fields, last)]
  parsed = [_parse_variant(v) for v in variants] or [("", [])]
  labels = [label for label, _ in parsed]
  if len(set(labels)) != len(labels):
    raise SweepError(f"--variant: a label is given twice ({labels})")
  runs = []
  for (label, assignments), values in itertools.product(
      parsed, itertools.product(*[vals for _, vals in axes])):
    parts = ([label] if label else []) + [
        f"{name}={_value_label(v)}" for name, v in zip(names, values)]
    runs.append(Run(index=len(runs), label="_".join(parts) or "run",
                    assignments=tuple(sets) + tuple(assignments) + tuple(
                        f"{field}={v}" for field, v in zip(fields, values))))
  if len({r.label for r in runs}) != len(runs):
    raise SweepError("two runs would share a folder name: " + ", ".join(r.label for r in runs))
  return runs


def build_config(config_path: str, run: Run) -> ml_collections.ConfigDict:
  """The base config with the run's assignments applied, validated (ConfigError, DataError)."""
  config = config_lib.load_config_file(config_path)
  for assignment in run.assignments:
    config_lib.apply_override(config, assignment)
  config_lib.validate(config)
  pipeline.validate_data_config(config.data)
  return config


def train_flags(run: Run) -> list[str]:
  """The run's assignments as `--config.field=value` flags of drt_jax.train (and eval)."""
  return [f"--config.{a}" for a in run.assignments]


def run_status(folder: str, num_train_steps: int) -> str:
  """"done", "step N" (the newest checkpoint of an unfinished run) or "new"."""
  checkpoints = os.path.join(folder, "checkpoints")
  steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit()] if os.path.isdir(
      checkpoints) else []
  if not steps:
    return "new"
  return "done" if max(steps) >= num_train_steps else f"step {max(steps)}"


def _record(path: str, config: str, runs: list[Run]):
  """Adds the runs to sweep.json (label -> assignments of every run the folder holds), refusing a
  label recorded with other assignments or another config: its folder holds another run."""
  saved = {"config": config, "runs": {}}
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved["config"] != config:
      raise SweepError(f"{path} records a sweep of --config {saved['config']}, not {config}; use "
                       "another --name")
  for run in runs:
    before = saved["runs"].get(run.label)
    if before is not None and before != list(run.assignments):
      raise SweepError(f"{path}: run {run.label} was trained with {' '.join(before)}; use "
                       "another --name (or --runs_dir)")
    saved["runs"][run.label] = list(run.assignments)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"  # array tasks may write it at once: whole, then renamed
  with open(tmp, "w") as f:
    json.dump(saved, f, indent=2)
  os.replace(tmp, path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m drt_jax.sweep", description=__doc__.split(
      "\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="experiment config file (configs/*.py)")
  parser.add_argument("--name", required=True, help="sweep name: runs go to RUNS_DIR/NAME/<label>")
  parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                      help="one axis of the product (repeatable)")
  parser.add_argument("--variant", action="append", default=[], metavar="'LABEL: F=V ...'",
                      help="a named set of fields, one more axis (repeatable)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a field of every run (repeatable)")
  parser.add_argument("--runs_dir", default="runs")
  parser.add_argument("--index", type=int, default=None, help="run only combination INDEX")
  parser.add_argument("--dry_run", action="store_true", help="list the runs and stop")
  args = parser.parse_args(argv)
  try:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", args.name) or ".." in args.name:
      raise SweepError(f"--name={args.name!r}: letters, digits, '.', '_', '-' and '/' only")
    runs = plan(args.grid, args.variant, args.set)
    if args.index is not None and not 0 <= args.index < len(runs):
      raise SweepError(f"--index={args.index}: the sweep has runs 0..{len(runs) - 1}")
    configs = {}
    for run in runs:
      try:
        configs[run.index] = build_config(args.config, run)
      except (config_lib.ConfigError, DataError) as error:
        raise SweepError(f"run {run.index} ({run.label}): {error}") from None
  except (SweepError, config_lib.ConfigError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  sweep_dir = os.path.join(args.runs_dir, args.name)
  selected = runs if args.index is None else [runs[args.index]]
  if args.dry_run:
    for run in runs:
      folder = os.path.join(sweep_dir, run.label)
      status = run_status(folder, configs[run.index].train.num_train_steps)
      print(f"{run.index:>3}  {status:<10}  {folder}  {' '.join(run.assignments)}")
    print(f"{len(runs)} runs; a SLURM array: sbatch --array=0-{len(runs) - 1} launch/sweep.sbatch "
          + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
                     if a != "--dry_run"))
    return 0
  try:
    _record(os.path.join(sweep_dir, "sweep.json"), args.config, selected)
  except SweepError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  failed = []
  for run in selected:
    folder = os.path.join(sweep_dir, run.label)
    status = run_status(folder, configs[run.index].train.num_train_steps)
    if status == "done":
      print(f"[{run.index}] {folder}: done, skipped", flush=True)
      continue
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "overrides.txt"), "w") as f:
      f.write("".join(flag + "\n" for flag in train_flags(run)))
    command = [sys.executable, "-m", "drt_jax.train", "--config", args.config, "--workdir",
               folder] + train_flags(run)
    print(f"[{run.index}] {folder}: {'resuming at ' + status if status != 'new' else 'starting'}"
          f"\n  {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    code = subprocess.call(command)
    print(f"[{run.index}] {folder}: exit {code}, {time.perf_counter() - start:.0f} s wall",
          flush=True)
    if code:
      failed.append(run.label)
  if failed:
    print(f"error: {len(failed)} of {len(selected)} runs failed: {', '.join(failed)}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
