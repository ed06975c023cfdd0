"""`python -m drt_jax.eval --task ppl|passkey|multikey|multihop --checkpoint RUN_DIR
--lengths 4032,16128 --out results.json [--config.field=value]`

The config is the run's own (run_config.py; `--config` starts from a file instead). Every
architecture is evaluated through its decoder (model/architectures.py).

ppl: perplexity over windows of each length from the held-out stream, non-overlapping, or every
--stride tokens scoring only each window's last stride tokens (docs/specification.md §7.1), or with
--scored N the same tokens at every length: window k of every length ends at token
max(lengths) + k N of the stream and scores its last N tokens, so the lengths differ only in the
context before those tokens and a perplexity-against-length curve compares like with like.
passkey, multikey, multihop: data/tasks.py samples in held-out text over a grid of lengths x needle
depths; the model greedily decodes the answer, which must match exactly, every token (§7.2-7.4).
Each length also reports how often the retrieval serving the answer held the needle's chunks
(needle_retrieved): misses then read as the retriever's or the reader's; null for architectures
that retrieve no chunks. --question_offset places the question's end that many tokens after a
chunk boundary (1, the default, is the layout of earlier results; `random` draws it per sample
from the seed, `all` takes 0 .. chunk_len - 1 in turn), and each length reports accuracy by
offset. DRT answers with prompt-end retrieval (inference.py) unless --noprompt_end_retrieval.
The results JSON records the whole config, the checkpoint step and the code's commit; a value
that is not finite (a diverged model's perplexity) is written as null.

Writes --out (JSON) and its plots beside it: <out>_heatmap.png (accuracy by depth and length),
<out>_accuracy.png (accuracy against length) and, with more than one question offset,
<out>_offset.png (accuracy by offset), or <out>_perplexity.png. Every input is checked
before anything runs, and the files appear only once everything has run.
"""

import dataclasses
import functools
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
import tqdm
from absl import app, flags

from drt_jax import cli
from drt_jax import config as config_lib
from drt_jax import generate as generate_lib
from drt_jax import run_config
from drt_jax.data import DataError
from drt_jax.data import pipeline
from drt_jax.data import sources
from drt_jax.data import tasks as tasks_lib
from drt_jax.data import tokenizer as tokenizer_lib
from drt_jax.model import architectures
from drt_jax.model.head import cross_entropy_sum

TASKS = ("ppl",) + tasks_lib.TASKS


def _define_flags():
  # Defined only when run as a program: eval.py and generate.py are also imported as libraries.
  generate_lib.define_session_flags("Longest length accepted (default: the longest of --lengths); "
                                    "sizes the chunk memory.")
  flags.DEFINE_enum("task", None, list(TASKS), "What to evaluate.")
  flags.DEFINE_string("lengths", None, "Comma-separated context lengths in tokens.")
  flags.DEFINE_string("out", None, "Results JSON; plots are written beside it.")
  flags.DEFINE_string("samples", "50", "Task samples per length, spread evenly over the depths "
                      "(rounded up): one count, or one per length (e.g. 50,50,20).")
  flags.DEFINE_integer("depths", 5, "Needle depths, evenly spaced from 0 to 1.")
  flags.DEFINE_integer("digits", 5, "Digits (tokens) per task value.")
  flags.DEFINE_integer("windows", 16, "ppl: at most this many windows per length.")
  flags.DEFINE_integer("stride", 0, "ppl: 0 = non-overlapping windows; s > 0 = a window every s "
                       "tokens, scoring its last s tokens (the first window: all).")
  flags.DEFINE_integer("scored", 0, "ppl: 0 = as --stride says; N > 0 = score the last N tokens "
                       "of each window, the same tokens of the stream at every length.")
  flags.DEFINE_integer("batch", 8, "Sequences decoded together.")
  flags.DEFINE_integer("seed", 0, "Seed of the samples (haystack offsets, values, needles).")
  flags.DEFINE_string("question_offset", "1", "Tasks: where the question ends, in tokens after "
                      "a chunk boundary: an integer in 0 .. model.chunk_len - 1 (1: the aligned "
                      "layout), 'random' (per sample, from --seed) or 'all' (each in turn).")


class EvalError(ValueError):
  """An evaluation setting that cannot work; the message names the flag and value."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to evaluate and how; check() validates it without running anything."""
  task: str
  lengths: tuple[int, ...]
  out: str
  samples: tuple[int, ...] = (50,)  # per length, or one count for all
  depths: int = 5
  digits: int = 5
  windows: int = 16
  stride: int = 0
  scored: int = 0
  batch: int = 8
  max_len: int | None = None
  segment_len: int | None = None
  chunk_memory: str = "device"
  seed: int = 0
  question_offset: int | str = 1  # 0 .. chunk_len - 1, "random" or "all" (tasks)
  prompt_end_retrieval: bool = True  # generate.continue_prompts' (tasks)


def parse_counts(text, flag: str = "--lengths") -> tuple[int, ...]:
  """"4032,16128" -> (4032, 16128); anything but positive integers is an EvalError."""
  parts = [p.strip() for p in str(text or "").split(",")]
  if not all(p.isdigit() and int(p) > 0 for p in parts):
    raise EvalError(f"{flag}={text!r}: must be comma-separated positive integers, e.g. "
                    "4032,16128")
  return tuple(int(p) for p in parts)


QUESTION_OFFSETS = ("random", "all")


def parse_question_offset(text) -> int | str:
  """"5" -> 5; any other text as it is, for check() to accept ("random", "all") or refuse."""
  text = str(text).strip()
  return int(text) if text.isdigit() else text


def question_offsets(settings: Settings, length: int, count: int, chunk_len: int) -> np.ndarray:
  """The question offset of each of the `count` samples of `length`: int [count]."""
  s = settings
  if s.question_offset == "all":
    return np.arange(count) % chunk_len
  if s.question_offset == "random":  # a generator of its own: the samples' draws stay the same
    return np.array([np.random.default_rng([s.seed, length, i, 1]).integers(chunk_len)
                     for i in range(count)])
  return np.full(count, int(s.question_offset))


def check(settings: Settings, config: ml_collections.ConfigDict, stream_len: int,
          builder: tasks_lib.TaskBuilder | None):
  """Raises EvalError (or DataError) naming the first setting that cannot work."""
  s = settings
  if s.task not in TASKS:
    raise EvalError(f"--task={s.task!r}: must be one of {', '.join(TASKS)}")
  c = config.model.chunk_len
  if s.question_offset not in QUESTION_OFFSETS and not (
      isinstance(s.question_offset, int) and 0 <= s.question_offset < c):
    raise EvalError(f"--question_offset={s.question_offset!r}: must be an integer in 0 .. "
                    f"{c - 1} (model.chunk_len={c}), 'random' or 'all'")
  generate_lib.check_prompt_end_retrieval(s.prompt_end_retrieval)
  for name in ("depths", "windows", "batch"):
    if getattr(s, name) < 1:
      raise EvalError(f"--{name}={getattr(s, name)}: must be a positive integer")
  if len(s.samples) not in (1, len(s.lengths)) or min(s.samples) < 1:
    raise EvalError(f"--samples={','.join(map(str, s.samples))}: must be one positive count, or "
                    f"one per length ({len(s.lengths)})")
  if s.stride < 0:
    raise EvalError(f"--stride={s.stride}: must be >= 0")
  if s.scored < 0:
    raise EvalError(f"--scored={s.scored}: must be >= 0")
  if s.scored and s.stride:
    raise EvalError(f"--scored={s.scored} and --stride={s.stride}: give one of them")
  if s.scored and s.scored >= min(s.lengths):
    raise EvalError(f"--scored={s.scored}: must be shorter than every length (the first token "
                    "of a window predicts nothing)")
  if os.path.isdir(s.out):
    raise EvalError(f"--out={s.out!r}: is a folder; name the results JSON file, e.g. "
                    f"{os.path.join(s.out, 'results.json')}")
  if not os.path.isdir(os.path.dirname(os.path.abspath(s.out))):
    raise EvalError(f"--out={s.out!r}: its folder does not exist")
  max_len = s.max_len or max(s.lengths)
  for length in s.lengths:
    if length > max_len:
      raise EvalError(f"--lengths: {length} is longer than --max_len={max_len}")
    if s.task == "ppl" and length > stream_len:
      raise EvalError(f"--lengths: {length} is longer than the held-out stream of "
                      f"data.source={config.data.source!r} ({stream_len} tokens)")
    if s.task == "ppl" and length < 2:
      raise EvalError(f"--lengths: {length} has no token to predict (needs >= 2)")
    if s.task != "ppl":
      builder.check(s.task, length)
  if s.stride and s.stride >= min(s.lengths):
    raise EvalError(f"--stride={s.stride}: must be shorter than every length")


def evaluate_retrieval(decoder, builder, settings: Settings, stream, progress=True) -> list[dict]:
  """Accuracy per length and depth of greedily decoded answers (exact match of the whole answer).

  Sample i of a length draws its haystack offset, values and needle places from
  np.random.default_rng([seed, length, i]); haystacks longer than the stream repeat it. Its
  question offset (question_offsets) does not change those draws.
  """
  s = settings
  c = decoder.config.chunk_len
  depths = np.linspace(0.0, 1.0, s.depths)
  answer_len = builder.answer_len(s.task)
  groups = decoder.retrieval_groups  # 0: no needle_retrieved

  def sample(length, i, depth, question_offset):
    rng = np.random.default_rng([s.seed, length, i])
    offset = int(rng.integers(len(stream)))
    haystack = np.take(stream, np.arange(offset, offset + length), mode="wrap")
    return builder.make(s.task, haystack, rng, float(depth), int(question_offset))

  def by_offset(values):
    return {str(o): float(values[offsets == o].mean()) for o in np.unique(offsets)}

  results = []
  for length, count in zip(s.lengths, np.broadcast_to(s.samples, len(s.lengths))):
    per_depth = -(-int(count) // s.depths)
    grid = np.repeat(depths, per_depth)  # sample i sits at depth grid[i]
    offsets = question_offsets(s, length, len(grid), c)
    # Batches of one offset where possible: prompts of one length are prefilled without the
    # masked pieces that prompts of different lengths add (Session._pieces).
    order = np.argsort(offsets, kind="stable")
    start = time.perf_counter()
    hits, found = np.zeros(len(grid), bool), np.zeros(len(grid), bool)
    with tqdm.tqdm(total=len(grid), desc=f"{s.task} @ {length}", disable=not progress) as bar:
      for first in range(0, len(grid), s.batch):
        ids = order[first:first + s.batch]
        batch = [sample(length, i, grid[i], offsets[i]) for i in ids]
        answers, session = generate_lib.continue_prompts(
            decoder, [x.prompt for x in batch], answer_len, chunk_memory=s.chunk_memory,
            prompt_end_retrieval=s.prompt_end_retrieval)
        hits[ids] = [tasks_lib.exact_match(x, a) for x, a in zip(batch, answers)]
        if groups:
          retrieved = [session.retrieved(g) for g in range(groups)]
          ends = ([session.prompt_end_retrieved(g) for g in range(groups)]
                  if s.prompt_end_retrieval else None)
          found[ids] = [needle_retrieved(x, [rows[i] for rows in retrieved], c,
                                         None if ends is None else [end[i] for end in ends])
                        for i, x in enumerate(batch)]
        bar.set_postfix(accuracy=f"{hits[order[:first + len(ids)]].mean():.3f}", refresh=False)
        bar.update(len(batch))
    row = {"length": length, "accuracy": float(hits.mean()), "samples": hits.size,
           "by_depth": {f"{d:g}": float(h.mean())
                        for d, h in zip(depths, hits.reshape(len(depths), per_depth))},
           "by_offset": by_offset(hits),
           "offset_samples": {str(o): int((offsets == o).sum()) for o in np.unique(offsets)},
           "needle_retrieved": None, "retrieved_by_depth": None, "retrieved_by_offset": None,
           "missed_though_retrieved": None}
    if groups:
      row.update(needle_retrieved=float(found.mean()),
                 retrieved_by_depth={f"{d:g}": float(f.mean()) for d, f in
                                     zip(depths, found.reshape(len(depths), per_depth))},
                 retrieved_by_offset=by_offset(found),
                 missed_though_retrieved=int((found & ~hits).sum()))
    results.append(row | {"wall_s": time.perf_counter() - start})
  return results


def needle_retrieved(sample: tasks_lib.Sample, retrieved, chunk_len: int,
                     prompt_end=None) -> bool:
  """Whether the retrieval serving the first answer token held every chunk of the answer's
  values.

  retrieved: per group, int [chunks, K] of the sample's sequence (Session.retrieved); row j is
  what chunk j's landmark retrieved, which serves chunk j + 1. prompt_end: per group, int [K]
  (Session.prompt_end_retrieved), the retrieval that served the prompt's end, or None when
  decoding used none (then the landmark before the chunk of the prompt's last token served).
  That chunk and the one before it count as held: the sliding window sees them (and neither
  is retrievable there). Any group's retrieval counts: each group's GCA reads its own.
  """
  last = (sample.answer_start - 1) // chunk_len  # the chunk of the prompt's last token
  needed = set((sample.evidence // chunk_len).tolist()) - {last - 1, last}
  if prompt_end is None:
    prompt_end = [rows[last - 1] if last else rows[:0].reshape(-1) for rows in retrieved]
  held = set(np.concatenate(prompt_end).tolist())
  return needed <= held


@functools.partial(jax.jit, static_argnames=("dtype",))
def _piece_nll(embedding, hidden, targets, mask, *, dtype):
  return cross_entropy_sum(hidden, embedding, targets, mask, dtype=dtype)


def evaluate_perplexity(decoder, settings: Settings, stream, progress=True) -> list[dict]:
  """Token-weighted mean NLL and perplexity per window length (§7.1)."""
  s = settings
  embedding = decoder.params["embed"]["embedding"]
  results = []
  for length in s.lengths:
    starts, scored = scored_windows(s, length, len(stream))
    start_time = time.perf_counter()
    total = count = 0.0
    with tqdm.tqdm(total=len(starts), desc=f"ppl @ {length}", disable=not progress) as bar:
      for i in range(0, len(starts), s.batch):
        rows = starts[i:i + s.batch]
        windows = np.stack([stream[r:r + length] for r in rows]).astype(np.int32)
        weights = scored[i:i + len(rows)]
        session = decoder.start(len(rows), s.chunk_memory)
        for offset, hidden in session.feed(windows):
          stop = min(offset + hidden.shape[1], length - 1)  # the last token predicts nothing
          if stop <= offset:
            continue
          nll, n = _piece_nll(embedding, hidden[:, :stop - offset],
                              windows[:, offset + 1:stop + 1], weights[:, offset + 1:stop + 1],
                              dtype=decoder.config.compute_dtype)
          total, count = total + float(nll), count + float(n)
          del hidden  # not held while the next piece runs (Session.prefill)
        bar.update(len(rows))
    results.append({"length": length, "nll": total / count,
                    "perplexity": float(np.exp(total / count)), "windows": len(starts),
                    "tokens": int(count), "scored_per_window": s.scored or None,
                    "wall_s": time.perf_counter() - start_time})
  return results


def scored_windows(settings: Settings, length: int, stream_len: int):
  """(window starts int [W], which tokens each scores float32 [W, length]) for `length`.

  A scored token t is predicted from t - 1. Default: non-overlapping windows, all tokens but
  the first; --stride s: a window every s tokens, the first scoring all, the others their last s;
  --scored N: window k ends at max(lengths) + k N, scoring its last N tokens (the same stream
  tokens at every length; W = the windows that fit, at most --windows).
  """
  s = settings
  if s.scored:
    longest = max(s.lengths)
    count = min(s.windows, (stream_len - longest) // s.scored + 1)
    starts = longest + s.scored * np.arange(count) - length
    scored = np.zeros((count, length), np.float32)
    scored[:, length - s.scored:] = 1
    return starts, scored
  starts = np.arange(0, stream_len - length + 1, s.stride or length)[:s.windows]
  scored = np.ones((len(starts), length), np.float32)
  scored[:, 0] = 0
  if s.stride:
    scored[1:, :length - s.stride] = 0
  return starts, scored


def plot(results: dict, out: str) -> dict:
  """The figures of `results`: {path beside `out`: matplotlib figure}."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from drt_jax import plotting

  base = os.path.splitext(out)[0]
  rows = results["results"]
  lengths = [r["length"] for r in rows]
  labels = [f"{plotting.short_count(n)}\n{n / results['train_len']:.4g}x" for n in lengths]
  figures = {}
  if results["task"] == "ppl":
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [r["perplexity"] for r in rows], marker="o")
    plotting.length_axis(ax, lengths, results["train_len"])
    scored = results["settings"].get("scored")
    ax.set(xlabel="context length (tokens; multiple of the training length)", ylabel="perplexity",
           title=f"perplexity, trained on {results['train_len']} tokens"
           + (f"\n(the same {scored} tokens per window at every length)" if scored else ""))
    figures[base + "_perplexity.png"] = fig
  else:
    depths = list(rows[0]["by_depth"])
    grid = np.array([[r["by_depth"][d] for r in rows] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.5 * len(depths) + 2))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
      ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), labels, fontsize=8)
    ax.set_yticks(range(len(depths)), depths)
    ax.set(xlabel="context length (tokens)", ylabel="needle depth",
           title=f"{results['task']} accuracy (exact match)")
    fig.colorbar(image, ax=ax)
    figures[base + "_heatmap.png"] = fig
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [r["accuracy"] for r in rows], marker="o", label="answer exact match")
    if rows[0]["needle_retrieved"] is not None:
      ax.plot(lengths, [r["needle_retrieved"] for r in rows], marker="x", linestyle="--",
              label="needle's chunks retrieved")
    ax.legend(loc="lower left")
    plotting.length_axis(ax, lengths, results["train_len"])
    ax.set(ylim=(-0.02, 1.02), xlabel="context length (tokens; multiple of the training length)",
           ylabel="fraction of samples",
           title=f"{results['task']}, trained on {results['train_len']} tokens")
    figures[base + "_accuracy.png"] = fig
    if any(len(r.get("by_offset", {})) > 1 for r in rows):
      figures[base + "_offset.png"] = plotting.offset_figure(results)
  return figures


def write(results: dict, out: str) -> list[str]:
  """Writes the plots and the JSON under temporary names, and renames them all once all exist,
  so a failure leaves no partial output."""
  import matplotlib.pyplot as plt

  figures = plot(results, out)
  pending = {}
  try:
    for path, fig in figures.items():
      fig.tight_layout()
      pending[path] = path + ".tmp.png"
      fig.savefig(pending[path], dpi=120)
      plt.close(fig)
    pending[out] = out + ".tmp"
    with open(pending[out], "w") as f:
      json.dump(run_config.json_safe(results), f, indent=2, allow_nan=False)
    for final, temporary in pending.items():
      os.replace(temporary, final)
  finally:
    for temporary in pending.values():
      if os.path.exists(temporary):
        os.remove(temporary)
  return list(pending)


def run(config: ml_collections.ConfigDict, checkpoint: str, settings: Settings,
        progress: bool = True, allow_change=()) -> dict:
  """Checks everything, evaluates, writes the files; returns the results. config is checked
  against the run's config.json first (run_config.changes_from_run; changes printed)."""
  model_config = config_lib.validate(config)
  architectures.check_chunk_memory(model_config, settings.chunk_memory)
  pipeline.validate_data_config(config.data)
  tokenizer = tokenizer_lib.make_tokenizer(config.data.tokenizer)
  stream = sources.load_corpus(config.data, tokenizer).eval.array()
  builder = None
  if settings.task != "ppl":
    builder = tasks_lib.TaskBuilder(tokenizer, model_config.chunk_len, digits=settings.digits)
  check(settings, config, len(stream), builder)
  model_config, params, step = generate_lib.load_run(config, checkpoint, allow_change)
  decoder = architectures.make_decoder(model_config, params,
                                       max_len=settings.max_len or max(settings.lengths),
                                       segment_len=settings.segment_len or config.data.seq_len)
  start = time.perf_counter()
  if settings.task == "ppl":
    rows = evaluate_perplexity(decoder, settings, stream, progress)
  else:
    rows = evaluate_retrieval(decoder, builder, settings, stream, progress)
  results = {"task": settings.task, "checkpoint": os.path.abspath(checkpoint),
             "checkpoint_step": step, "commit": run_config.code_commit(),
             "arch": model_config.arch, "train_len": config.data.seq_len,
             "chunk_len": model_config.chunk_len, "settings": dataclasses.asdict(settings),
             "config": run_config.as_json(config), "wall_s": time.perf_counter() - start,
             "device": jax.devices()[0].device_kind, "results": rows}
  write(results, settings.out)
  return results


def main(argv):
  cli.start(argv)
  f = flags.FLAGS
  try:
    settings = Settings(
        task=f.task, lengths=parse_counts(f.lengths), out=f.out,
        samples=parse_counts(f.samples, "--samples"),
        depths=f.depths, digits=f.digits, windows=f.windows, stride=f.stride, scored=f.scored,
        batch=f.batch,
        max_len=f.max_len, segment_len=f.segment_len, chunk_memory=f.chunk_memory, seed=f.seed,
        question_offset=parse_question_offset(f.question_offset),
        prompt_end_retrieval=f.prompt_end_retrieval)
    results = run(f.config, f.checkpoint, settings, allow_change=f.allow_change)
  except generate_lib.ERRORS + (EvalError,) as error:
    raise SystemExit(f"error: {error}") from None
  for row in results["results"]:
    if settings.task == "ppl":
      value = f"{row['perplexity']:.4f}"
    elif row["needle_retrieved"] is None:
      value = f"{row['accuracy']:.4f}"
    else:
      value = f"{row['accuracy']:.4f} (needle retrieved {row['needle_retrieved']:.4f})"
    print(f"{settings.task} length {row['length']:>9}: {value} ({row['wall_s']:.1f} s)")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["checkpoint", "task", "lengths", "out"])
  app.run(main, argv=run_config.with_run_config(sys.argv))
