"""`python -m drt_jax.compare RUN_DIR ... --out DIR`: one table and overlaid plots of several runs.

A RUN_DIR is a training run folder (config.json, metrics.jsonl) or a folder of them (a sweep's
RUNS_DIR/NAME: every sub-folder with a config.json). Per run it reads:
  - config.json: the table shows only the fields whose values differ between the runs;
  - metrics.jsonl: the last training loss, the last periodic eval (eval_loss, eval_perplexity,
    eval_<task>_accuracy), the median step time of the logged intervals after the first (the
    first holds compilation), the training tokens (step x global batch x data.seq_len);
  - RUN/eval/*.json: `drt_jax.eval --out` results (drt_jax.sweep's convention): a column per
    file and length, `<file>@<length>` (perplexity for ppl, exact-match accuracy for the tasks),
    and for the tasks `<file> retrieved@<length>` (how often retrieval held the needle's chunks).
Runs whose configs differ only in `seed` form one variant; when a variant has several seeds the
Markdown also gets a table of their means and spreads (max - min).

Writes DIR/compare.md, DIR/compare.csv (one row per run), DIR/compare.json (everything read, for
bench/results/), and the plots DIR/loss.png (training and eval loss against training tokens),
DIR/perplexity.png (perplexity against evaluation length, one line per run and ppl file) and
DIR/accuracy.png (task accuracy against length, dashed: needle retrieved; a panel per task
file), each only when some run has its data.
"""

import argparse
import csv
import glob
import json
import os
import statistics
import sys

from drt_jax.sweep import EVAL_DIR


class CompareError(ValueError):
  """An input that cannot be compared; the message names it."""


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else value
  return flat


def find_runs(paths: list[str]) -> list[str]:
  """The run folders among `paths`, a folder of runs contributing each of its runs (sorted)."""
  runs = []
  for path in paths:
    if os.path.isfile(os.path.join(path, "config.json")):
      runs.append(path)
      continue
    inner = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "*", "config.json")))
    if not inner:
      raise CompareError(f"{path}: neither a run folder (no config.json) nor a folder of runs")
    runs += inner
  if len(set(map(os.path.realpath, runs))) != len(runs):
    raise CompareError("a run is given twice: " + ", ".join(runs))
  return runs


def _read_metrics(run: str) -> list[dict]:
  """metrics.jsonl as {step: merged record}, the later record winning (a resumed run rewrites)."""
  path = os.path.join(run, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  by_step: dict[int, dict] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_step.setdefault(record["step"], {}).update(record)
  return [by_step[s] for s in sorted(by_step)]


def read_run(run: str) -> dict:
  """What compare needs of one run folder."""
  with open(os.path.join(run, "config.json")) as f:
    config = json.load(f)
  rows = _read_metrics(run)
  tokens_per_step = config["train"]["global_batch_size"] * config["data"]["seq_len"]
  train = [r for r in rows if "loss" in r]
  evals = [r for r in rows if "eval_loss" in r]
  times = [r["step_time_s"] for r in train if "step_time_s" in r][1:]
  final = {}
  if train:
    final["train_loss"] = train[-1]["loss"]
  if evals:
    final.update({k: v for k, v in evals[-1].items() if k.startswith("eval_")
                  and (k in ("eval_loss", "eval_perplexity") or k.endswith("_accuracy"))
                  and not k.endswith("_token_accuracy")})
  results = {}
  for path in sorted(glob.glob(os.path.join(run, EVAL_DIR, "*.json"))):
    with open(path) as f:
      data = json.load(f)
    if isinstance(data, dict) and "task" in data and "results" in data:
      results[os.path.splitext(os.path.basename(path))[0]] = data
  return {"path": run, "config": _flatten(config), "final": final,
          "step": rows[-1]["step"] if rows else 0,
          "tokens": (rows[-1]["step"] if rows else 0) * tokens_per_step,
          "step_time_s": statistics.median(times) if times else None,
          "curve": [{"tokens": r["step"] * tokens_per_step, **{
              k: r[k] for k in ("loss", "eval_loss") if k in r}} for r in rows
                    if "loss" in r or "eval_loss" in r],
          "evals": results}


def _labels(runs: list[str]) -> list[str]:
  """Shortest unique path suffixes: "topk=4" for runs/s/topk=4 unless two runs share it."""
  parts = [os.path.normpath(r).split(os.sep) for r in runs]
  for depth in range(1, max(map(len, parts)) + 1):
    labels = [os.sep.join(p[-depth:]) for p in parts]
    if len(set(labels)) == len(labels):
      return labels
  return runs


def _eval_columns(data: dict) -> dict:
  from drt_jax import plotting

  columns = {}
  for name, result in data["evals"].items():
    metric = "perplexity" if result["task"] == "ppl" else "accuracy"
    for row in result["results"]:
      columns[f"{name}@{plotting.short_count(row['length'])}"] = row[metric]
    for row in result["results"]:  # how often retrieval held the needle: a miss's culprit
      if "needle_retrieved" in row:
        columns[f"{name} retrieved@{plotting.short_count(row['length'])}"] = row[
            "needle_retrieved"]
  return columns


def table(runs: list[dict]) -> tuple[list[str], list[list]]:
  """(header, rows): label, differing config fields, final metrics, step time, eval results."""
  fields = sorted(set().union(*(r["config"] for r in runs)))
  differ = [f for f in fields if len({json.dumps(r["config"].get(f)) for r in runs}) > 1]
  finals = sorted(set().union(*(r["final"] for r in runs)),
                  key=lambda k: (k != "train_loss", k))
  evals = list(dict.fromkeys(c for r in runs for c in _eval_columns(r)))
  header = ["run", *differ, "steps", "train tokens", "step time (ms)", *finals, *evals]
  rows = []
  for r in runs:
    e = _eval_columns(r)
    rows.append([r["label"], *[r["config"].get(f) for f in differ], r["step"], r["tokens"],
                 None if r["step_time_s"] is None else 1000 * r["step_time_s"],
                 *[r["final"].get(k) for k in finals], *[e.get(c) for c in evals]])
  return header, rows


def by_variant(header: list[str], rows: list[list]) -> tuple[list[str], list[list]] | None:
  """Rows grouped over `seed` (mean and max - min of every number), or None if no group has
  two members."""
  if "seed" not in header:
    return None
  seed = header.index("seed")
  numeric = [i for i, h in enumerate(header)
             if i > seed and h not in ("steps", "train tokens") and any(
                 isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows)]
  keys = [i for i in range(1, len(header)) if i != seed and i not in numeric
          and header[i] not in ("steps", "train tokens")]
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault(tuple(json.dumps(r[i]) for i in keys), []).append(r)
  if all(len(g) < 2 for g in groups.values()):
    return None
  out_header = ["runs", "seeds", *[header[i] for i in keys], *[header[i] for i in numeric]]
  out = []
  for group in groups.values():
    cells = []
    for i in numeric:
      values = [r[i] for r in group if isinstance(r[i], (int, float))]
      cells.append("" if not values else _fmt(statistics.mean(values)) + (
          f" ± {_fmt((max(values) - min(values)) / 2)}" if len(values) > 1 else ""))
    out.append([", ".join(r[0] for r in group), ", ".join(str(r[seed]) for r in group),
                *[group[0][i] for i in keys], *cells])
  return out_header, out


def _fmt(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
  return str(value)


def markdown(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def plots(runs: list[dict]) -> dict:
  """{file name: matplotlib figure} of the curves the runs have."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  from drt_jax import plotting

  figures = {}
  colors = {r["label"]: f"C{i % 10}" for i, r in enumerate(runs)}
  if any(r["curve"] for r in runs):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
      train = [(p["tokens"], p["loss"]) for p in r["curve"] if "loss" in p]
      evals = [(p["tokens"], p["eval_loss"]) for p in r["curve"] if "eval_loss" in p]
      if train:
        ax.plot(*zip(*train), color=colors[r["label"]], alpha=0.6, lw=1, label=r["label"])
      if evals:
        ax.plot(*zip(*evals), color=colors[r["label"]], marker="o", ls="--", lw=1.5,
                label=f"{r['label']} (eval)")
    ax.set(xlabel="training tokens", ylabel="loss (nats per token)",
           title="training loss (line) and held-out loss (markers)")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
        lambda x, _: plotting.short_count(x) if x > 0 else "0"))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    figures["loss.png"] = fig
  ppl = [(r, name, e) for r in runs for name, e in r["evals"].items() if e["task"] == "ppl"]
  if ppl:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    files = {name for _, name, _ in ppl}
    lengths, train_lens = set(), {e["train_len"] for _, _, e in ppl}
    for r, name, e in ppl:
      xs = [row["length"] for row in e["results"]]
      lengths.update(xs)
      ax.plot(xs, [row["perplexity"] for row in e["results"]], marker="o",
              color=colors[r["label"]],
              label=r["label"] + (f" ({name})" if len(files) > 1 else ""))
    plotting.length_axis(ax, lengths, train_lens.pop() if len(train_lens) == 1 else None)
    ax.set(xlabel="evaluation length (tokens)", ylabel="perplexity",
           title="held-out perplexity against evaluation length")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    figures["perplexity.png"] = fig
  tasks = sorted({name for r in runs for name, e in r["evals"].items() if e["task"] != "ppl"})
  if tasks:
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.5), squeeze=False)
    for ax, name in zip(axes[0], tasks):
      lengths, train_lens = set(), set()
      for r in runs:
        e = r["evals"].get(name)
        if e is None or e["task"] == "ppl":
          continue
        xs = [row["length"] for row in e["results"]]
        lengths.update(xs)
        train_lens.add(e["train_len"])
        ax.plot(xs, [row["accuracy"] for row in e["results"]], marker="o",
                color=colors[r["label"]], label=r["label"])
        if all("needle_retrieved" in row for row in e["results"]):
          ax.plot(xs, [row["needle_retrieved"] for row in e["results"]], marker="x", ls="--",
                  alpha=0.6, color=colors[r["label"]], label=f"{r['label']} needle retrieved")
      plotting.length_axis(ax, lengths, train_lens.pop() if len(train_lens) == 1 else None)
      ax.set(ylim=(-0.03, 1.03), xlabel="context length (tokens)",
             ylabel="fraction of samples (exact match; dashed: needle retrieved)", title=name)
      ax.legend(fontsize=7)
      ax.grid(alpha=0.3)
    figures["accuracy.png"] = fig
  return figures


def compare(paths: list[str], out: str) -> dict:
  """Reads the runs, writes the tables and plots into `out`; returns what was read."""
  runs = find_runs(paths)
  data = [read_run(r) for r in runs]
  for d, label in zip(data, _labels(runs)):
    d["label"] = label
  header, rows = table(data)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "compare.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows([["" if c is None else c for c in row] for row in rows])
  text = markdown(header, rows)
  grouped = by_variant(header, rows)
  if grouped:
    text += "\nMean over seeds (± half the range):\n\n" + markdown(*grouped)
  with open(os.path.join(out, "compare.md"), "w") as f:
    f.write(text)
  import matplotlib.pyplot as plt

  for name, fig in plots(data).items():
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=120)
    plt.close(fig)
  record = {"runs": data, "table": {"header": header, "rows": rows}}
  with open(os.path.join(out, "compare.json"), "w") as f:
    json.dump(record, f, indent=2)
  return record


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m drt_jax.compare",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
  parser.add_argument("--out", required=True, help="folder for compare.md/.csv/.json and plots")
  args = parser.parse_args(argv)
  try:
    record = compare(args.runs, args.out)
  except CompareError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(open(os.path.join(args.out, "compare.md")).read(), end="")
  print(f"{len(record['runs'])} runs -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
