"""grain pipelines: random training windows and consecutive held-out eval windows.

Training (docs/specification.md §6 "Loading"): global sample i = step * global_batch + row is the
window tokens[s, s + T) of the train stream, s uniform in [0, n - T - 1) drawn from
np.random.default_rng([seed, i]). Windows ignore document boundaries; labels are the inputs (the
model shifts them). Process p reads rows [p * B, (p + 1) * B) of every global batch,
B = global_batch / process_count, so the global batch is the same whatever process_count or
data.worker_count.

With data.task_fraction > 0, that fraction of the training samples become passkey-style tasks
built on their own window (tasks.py; data.tasks names the kinds), as in the reference's NIAH
fine-tuning mixture (§7.5).

Eval (docs/specification.md §7.1, stride -1): window k is tokens[k * T, (k + 1) * T) of the
held-out stream; global eval batch b holds windows b * E + row, E = eval_batch_size(config), split
across processes as above. A held-out stream of fewer windows than the batches need pads the last
batch with rows of weight 0, so any held-out set of at least one window works. With tasks mixed
in, a held-out batch of task samples per kind also measures the answers' accuracy
(make_task_eval_batches).
"""

import importlib.util
import os

import grain
import numpy as np

from drt_jax.data import DataError
from drt_jax.data import sources
from drt_jax.data import tasks as tasks_lib
from drt_jax.data import tokenizer as tokenizer_lib

# Index space of the training iterator, in batches: never exhausted by a real run, so the iterator
# needs no length and a resume continues at the saved batch.
_NUM_BATCHES = 2**40


def validate_data_config(data) -> None:
  """Checks config.data without reading any data; raises DataError naming the field and value."""
  if data.source not in sources.SOURCES:
    raise DataError(f"data.source={data.source!r}: must be one of "
                    + ", ".join(map(repr, sources.SOURCES)))
  if data.tokenizer != "byte" and not os.path.isfile(data.tokenizer):
    raise DataError(f"data.tokenizer={data.tokenizer!r}: must be 'byte' or the path of a "
                    "HuggingFace tokenizers JSON file (no such file)")
  if not isinstance(data.seq_len, int) or data.seq_len < 1:
    raise DataError(f"data.seq_len={data.seq_len!r}: must be a positive integer")
  if not 0 < data.eval_fraction < 1:
    raise DataError(f"data.eval_fraction={data.eval_fraction!r}: must be in (0, 1)")
  if not isinstance(data.worker_count, int) or data.worker_count < 0:
    raise DataError(f"data.worker_count={data.worker_count!r}: must be an integer >= 0")
  if data.source in sources.FILE_SOURCES:
    if not os.path.exists(data.path):
      raise DataError(f"data.path={data.path!r}: no such file or folder "
                      f"(data.source={data.source!r})")
    if data.eval_path and not os.path.exists(data.eval_path):
      raise DataError(f"data.eval_path={data.eval_path!r}: no such file or folder (or '': hold "
                      "out data.eval_fraction of data.path)")
    if data.source != "text" and not (isinstance(data.text_field, str) and data.text_field):
      raise DataError(f"data.text_field={data.text_field!r}: must name the records' text field "
                      f"(data.source={data.source!r})")
  elif data.eval_path:
    raise DataError(f"data.eval_path={data.eval_path!r}: only for data.source "
                    + ", ".join(map(repr, sources.FILE_SOURCES))
                    + f" (data.source={data.source!r} " + (
                        "reads the 'validation' split)" if data.source == "tfds"
                        else "holds out data.eval_fraction)"))
  if data.source == "datasets":
    if importlib.util.find_spec("datasets") is None:
      raise DataError("data.source='datasets': needs the HuggingFace `datasets` package "
                      "(pip install 'drt-jax[datasets]')")
    for field, path in (("data.path", data.path), ("data.eval_path", data.eval_path)):
      if path and not any(os.path.isfile(os.path.join(path, name))
                          for name in ("dataset_info.json", "dataset_dict.json")):
        raise DataError(f"{field}={path!r}: not a folder written by datasets' save_to_disk (no "
                        "dataset_info.json or dataset_dict.json in it)")
  if data.source == "tfds" and not data.tfds_name:
    raise DataError("data.tfds_name='': must name a TFDS dataset, e.g. 'pg19' (data.source='tfds')")
  if not 0 <= data.task_fraction <= 1:
    raise DataError(f"data.task_fraction={data.task_fraction!r}: must be in [0, 1]")
  if not (isinstance(data.task_answer_weight, (int, float)) and data.task_answer_weight > 0):
    raise DataError(f"data.task_answer_weight={data.task_answer_weight!r}: must be a number > 0")
  if data.task_fraction and not set(_task_names(data)) <= set(tasks_lib.TASKS):
    raise DataError(f"data.tasks={data.tasks!r}: must be a comma-separated subset of "
                    + ", ".join(tasks_lib.TASKS))


def _task_names(data) -> tuple[str, ...]:
  return tuple(name.strip() for name in data.tasks.split(","))


class _TrainWindow:
  """Local sample index j -> {"inputs": int32 [seq_len]}, the window of global sample i."""

  def __init__(self, span: sources.TokenSpan, *, seq_len: int, seed: int, global_batch: int,
               local_batch: int, process_index: int, tasks: tasks_lib.TaskMixture | None):
    self.span = span
    self.tasks = tasks
    self.seq_len = seq_len
    self.seed = seed
    self.global_batch = global_batch
    self.local_batch = local_batch
    self.row_offset = process_index * local_batch
    self._tokens = None

  def __getstate__(self):
    # grain pickles transforms into worker processes: send the file's name, not its tokens.
    return {**self.__dict__, "_tokens": None}

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    if self._tokens is None:
      self._tokens = self.span.array()
    step, row = divmod(j, self.local_batch)
    i = step * self.global_batch + self.row_offset + row
    start = np.random.default_rng([self.seed, i]).integers(0, len(self.span) - self.seq_len - 1)
    window = self._tokens[start:start + self.seq_len].astype(np.int32)
    return {"inputs": window} if self.tasks is None else self.tasks(window, i)


def make_train_iterator(config, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """The training batches of this process, {"inputs": int32 [global_batch / process_count, T]},
  with tasks mixed in also "target_weights": float32 [same] (data.task_answer_weight on answers).

  One batch per call of next(); checkpoint it with get_state/set_state or orbax
  (grain.checkpoint.CheckpointSave / CheckpointRestore). The index space never runs out.
  """
  local_batch = _local_batch(config, process_index, process_count)
  if config.seed < 0:
    raise DataError(f"seed={config.seed}: must be >= 0 (it seeds the window sampler)")
  corpus = _load_corpus(config)
  n, seq_len = len(corpus.train), config.data.seq_len
  if n < seq_len + 2:
    raise DataError(f"training stream has {n} tokens: too short for windows of "
                    f"data.seq_len={seq_len} (needs >= {seq_len + 2})")
  tasks = None
  if config.data.task_fraction:
    tasks = tasks_lib.TaskMixture(_task_builder(config), _task_names(config.data),
                                  config.data.task_fraction, config.seed, seq_len,
                                  answer_weight=config.data.task_answer_weight)
  window = _TrainWindow(corpus.train, seq_len=seq_len, seed=config.seed,
                        global_batch=config.train.global_batch_size, local_batch=local_batch,
                        process_index=process_index, tasks=tasks)
  dataset = (grain.MapDataset.range(_NUM_BATCHES * local_batch)
             .map(window)
             .batch(local_batch, drop_remainder=True)
             .to_iter_dataset())
  if config.data.worker_count > 0:
    _mark_absl_flags_parsed()
    options = grain.MultiprocessingOptions(num_workers=config.data.worker_count)
    dataset = dataset.mp_prefetch(options)
  return iter(dataset)


def eval_batch_size(config) -> int:
  """Sequences per eval batch over all processes: train.eval_batch_size, or for 0 the training
  micro-batch (train.global_batch_size / train.grad_accum_steps), which is known to fit."""
  train = config.train
  return train.eval_batch_size or train.global_batch_size // train.grad_accum_steps


def make_eval_batches(config, num_batches: int, *, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Up to `num_batches` held-out batches of this process, {"inputs": int32 [E / process_count,
  T], "target_weights": float32 [same]} with E = eval_batch_size(config), the same on every
  call. Rows past the held-out stream's last whole window have weight 0 (and zero inputs)."""
  global_batch, seq_len = eval_batch_size(config), config.data.seq_len
  local_batch = _split_rows(global_batch, "train.eval_batch_size", process_index, process_count)
  tokens = _load_corpus(config).eval.array()
  num_windows = len(tokens) // seq_len
  if num_windows == 0:
    raise DataError(f"held-out stream has {len(tokens)} tokens = 0 windows of "
                    f"data.seq_len={seq_len}: " + (
                        f"data.eval_path={config.data.eval_path!r} needs more text"
                        if config.data.eval_path else "raise data.eval_fraction"))
  num_windows = min(num_windows, num_batches * global_batch)
  num_batches = -(-num_windows // global_batch)
  inputs = np.zeros((num_batches * global_batch, seq_len), np.int32)
  inputs[:num_windows] = tokens[:num_windows * seq_len].reshape(num_windows, seq_len)
  weights = np.zeros(inputs.shape, np.float32)
  weights[:num_windows] = 1.0
  rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  return [{"inputs": batch[rows], "target_weights": batch_weights[rows]}
          for batch, batch_weights in zip(inputs.reshape(num_batches, global_batch, seq_len),
                                          weights.reshape(num_batches, global_batch, seq_len))]


def make_task_eval_batches(config, *, process_index: int = 0,
                           process_count: int = 1) -> dict[str, dict[str, np.ndarray]]:
  """Per task of data.tasks (when data.task_fraction > 0), one held-out global batch (of
  eval_batch_size(config) rows) of task samples of the training length: {task: {"inputs": int32
  [local_batch, T], "answer_start": int32 [local_batch], "answer": int32 [local_batch, answer
  tokens]}}. Row r of the global batch puts the needle at depth r / (rows - 1) in the haystack
  of held-out window r (the stream repeats if it is short); the same on every call.
  """
  if not config.data.task_fraction:
    return {}
  global_batch, seq_len = eval_batch_size(config), config.data.seq_len
  local_batch = _split_rows(global_batch, "train.eval_batch_size", process_index, process_count)
  tokens = _load_corpus(config).eval.array()
  builder = _task_builder(config)
  depths = np.linspace(0.0, 1.0, global_batch)
  rows = range(process_index * local_batch, (process_index + 1) * local_batch)
  batches = {}
  for t, task in enumerate(_task_names(config.data)):
    samples = [builder.make(task, np.take(tokens, np.arange(r * seq_len, (r + 1) * seq_len),
                                          mode="wrap"),
                            np.random.default_rng([config.seed, t, r, 2]), depths[r])
               for r in rows]
    batches[task] = {"inputs": np.stack([x.tokens for x in samples]),
                     "answer_start": np.array([x.answer_start for x in samples], np.int32),
                     "answer": np.stack([x.answer for x in samples])}
  return batches


def _task_builder(config) -> tasks_lib.TaskBuilder:
  return tasks_lib.TaskBuilder(tokenizer_lib.make_tokenizer(config.data.tokenizer),
                               config.model.chunk_len)


def _local_batch(config, process_index: int, process_count: int) -> int:
  return _split_rows(config.train.global_batch_size, "train.global_batch_size", process_index,
                     process_count)


def _split_rows(global_batch: int, field: str, process_index: int, process_count: int) -> int:
  """Rows of a global batch of `global_batch` (the value of `field`) that each process reads."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}: "
                     "need 0 <= process_index < process_count")
  if global_batch < 1 or global_batch % process_count:
    raise DataError(f"{field}={global_batch}: must be a positive multiple of the process count "
                    f"{process_count}")
  return global_batch // process_count


def _load_corpus(config) -> sources.Corpus:
  validate_data_config(config.data)
  tok = tokenizer_lib.make_tokenizer(config.data.tokenizer)
  if config.model.vocab_size and tok.vocab_size > config.model.vocab_size:  # 0: the tokenizer's
    # The embedding lookup would silently clamp the out-of-range ids.
    raise DataError(f"model.vocab_size={config.model.vocab_size}: smaller than the vocabulary of "
                    f"data.tokenizer={config.data.tokenizer!r} ({tok.vocab_size})")
  return sources.load_corpus(config.data, tok)


def _mark_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; when no absl app parsed them (pytest, argparse
  # scripts) they would fail on the first flag access.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
