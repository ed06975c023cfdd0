"""Token corpora: a source's documents, tokenized, eos after each, as one flat array cached on disk.

Sources (`data.source`):
  pydoc  the standard library's `pydoc_data.topics` (~490k characters of English, on every Python),
         one document per topic in sorted-key order.
  pystdlib  the standard library's own Python sources (~35M characters of code with its tests on a
         full install), every `*.py` file under sysconfig's "stdlib" folder outside site-packages /
         dist-packages, in sorted path order, one document per file: a corpus too large for a small
         model to memorise, with no download. Split BY FILE (stdlib_split): held-out files are
         never seen in training, so long-context evaluation reads whole unseen files.
  text   `data.path`: a file, or a folder read recursively (hidden names skipped), files in sorted
         path order, one document per file; binary (NUL bytes) and non-UTF-8 files are skipped.
  jsonl  `data.path`: a JSON-lines file (`.gz`: gzip-compressed), or a folder of `*.jsonl` and
         `*.jsonl.gz` files read recursively in sorted path order; one document per line, the
         string `data.text_field` of the line's object.
  parquet  `data.path`: a Parquet file or a folder of `*.parquet` files (sorted, recursive); one
         document per row, the string column `data.text_field` (read with pyarrow).
  datasets  `data.path`: a folder written by HuggingFace `datasets`' `save_to_disk` (optional
         dependency: pip install 'drt-jax[datasets]'); one document per row, column
         `data.text_field`. A DatasetDict gives its "train" split as data.path and its
         "validation" split as data.eval_path (the same folder may be both).
  tfds   `data.tfds_name` through `tfds.data_source` (array_record, no tensorflow): "pg19" where the
         user has prepared it, or "drt_text_files" (text_files_tfds.py). The text feature is "text"
         or pg19's "book_text".
Empty documents are skipped. Document boundaries are kept only as eos tokens: training windows run
across them, as in the reference (docs/specification.md §6 "Loading").

Tokens are stored as uint16 when the vocabulary fits (the reference's layout, half the disk and page
cache of uint32 on PG19-size corpora), else uint32, in a raw file under `data.cache_dir` named by a
hash of (source, path or name, split, file stats or content, text field, tokenizer), and
memory-mapped: restarts and grain workers neither re-tokenize nor copy the corpus. In a run of
several processes, process 0 tokenizes and the others wait for its file (`_cached_tokens`).

Held-out data: `data.eval_path` (text, jsonl, parquet, datasets) names its own files, read like
data.path; tfds uses the "validation" split; pystdlib holds out `data.eval_fraction` of its files
(stdlib_split); otherwise the last `data.eval_fraction` of the token stream is held out.
"""

import dataclasses
import gzip
import hashlib
import itertools
import json
import logging
import math
import os
import re
import socket
import sysconfig
import time
import uuid
from typing import Callable, Iterable, Iterator

import numpy as np

from drt_jax.data import DataError
from drt_jax.data.tokenizer import Tokenizer

SOURCES = ("pydoc", "pystdlib", "text", "jsonl", "parquet", "datasets", "tfds")
FILE_SOURCES = ("text", "jsonl", "parquet", "datasets")  # read data.path, and data.eval_path if set
TFDS_TRAIN_SPLIT = "train"
TFDS_EVAL_SPLIT = "validation"
TFDS_TEXT_FEATURES = ("text", "book_text")  # book_text: pg19
DEFAULT_CACHE_DIR = "~/.cache/drt_jax"
_CACHE_VERSION = 1  # part of every cache key: bump when tokenization or the file layout changes
_ENCODE_BATCH = 64  # documents per tokenizer call (HF tokenizers encode a batch in parallel)
_PROGRESS_MIN_DOCS = 1000  # a progress bar only from this many documents; fewer take seconds
# Other processes wait for process 0's token file; one that sees neither the file nor process 0's
# claim on it this long (a cache folder that is not shared) tokenizes the corpus itself.
_CLAIM_GRACE_S = 60.0
_POLL_S = 0.5


@dataclasses.dataclass(frozen=True)
class TokenSpan:
  """tokens[start:stop] of a cached token file; pickles as these fields, never as the tokens."""

  path: str
  dtype: str
  start: int
  stop: int

  def __len__(self) -> int:
    return self.stop - self.start

  def array(self) -> np.ndarray:
    """The tokens, [stop - start] of `dtype`, memory-mapped read-only."""
    return np.memmap(self.path, self.dtype, mode="r")[self.start:self.stop]


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: TokenSpan  # the stream training windows are drawn from
  eval: TokenSpan  # the held-out stream, disjoint from `train`


def load_corpus(data, tokenizer: Tokenizer) -> Corpus:
  """Tokenizes (or reads from the cache) the corpus that `data` (config.data) names."""
  if data.source == "tfds":
    return Corpus(train=_tfds_tokens(data, TFDS_TRAIN_SPLIT, tokenizer),
                  eval=_tfds_tokens(data, TFDS_EVAL_SPLIT, tokenizer))
  if data.source == "pydoc":
    stream = _pydoc_tokens(data, tokenizer)
  elif data.source == "pystdlib":
    train_files, eval_files = stdlib_split(python_stdlib_files(), data.eval_fraction)
    where = "data.source='pystdlib'"
    return Corpus(
        train=_file_tokens(data, tokenizer, "pystdlib", train_files, _text_documents, where=where),
        eval=_file_tokens(data, tokenizer, "pystdlib-eval", eval_files, _text_documents,
                          where=where))
  elif data.source in FILE_SOURCES:
    stream = _source_tokens(data, tokenizer, data.path, "data.path", TFDS_TRAIN_SPLIT)
    if data.eval_path:
      return Corpus(train=stream, eval=_source_tokens(data, tokenizer, data.eval_path,
                                                      "data.eval_path", TFDS_EVAL_SPLIT))
  else:
    raise DataError(f"data.source={data.source!r}: must be one of {', '.join(map(repr, SOURCES))}")
  n_eval = int(len(stream) * data.eval_fraction)
  split = stream.stop - n_eval
  return Corpus(train=dataclasses.replace(stream, stop=split),
                eval=dataclasses.replace(stream, start=split))


def _source_tokens(data, tokenizer: Tokenizer, path: str, field: str, split: str) -> TokenSpan:
  """The tokens of `path` (data.path or data.eval_path, named `field` in errors) read as
  data.source says; `split` is the DatasetDict split taken for it."""
  where = f"{field}={path!r}"
  if data.source == "datasets":
    return _datasets_tokens(data, tokenizer, path, split, where=where)
  suffixes, read = _FILE_READERS[data.source]
  files = list_text_files(path, field=field, suffixes=suffixes)
  return _file_tokens(data, tokenizer, data.source, files, read, where=where)


def list_text_files(path: str, *, field: str = "data.path",
                    suffixes: tuple[str, ...] | None = None) -> list[str]:
  """`path` itself if it is a file, else every non-hidden file below it (ending in one of
  `suffixes`, if given), sorted. `field` names the setting in errors."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise DataError(f"{field}={path!r}: no such file or folder")
  files = []
  for root, dirs, names in os.walk(path):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    files += [os.path.join(root, n) for n in names
              if not n.startswith(".") and (suffixes is None or n.endswith(suffixes))]
  if suffixes is not None and not files:
    raise DataError(f"{field}={path!r}: no {' or '.join('*' + x for x in suffixes)} files in "
                    "this folder")
  return sorted(files)


def read_text_file(path: str) -> str | None:
  """The file's text, or None when it is binary (has NUL bytes) or not UTF-8."""
  with open(path, "rb") as f:
    raw = f.read()
  if b"\0" in raw:
    return None
  try:
    return raw.decode("utf-8-sig")  # -sig: a leading byte-order mark is not text
  except UnicodeDecodeError:
    return None


def _pydoc_tokens(data, tokenizer: Tokenizer) -> TokenSpan:
  from pydoc_data.topics import topics

  docs = [topics[k] for k in sorted(topics)]
  # Keyed by content: the topics change between Python versions.
  digest = hashlib.sha256("\0".join(docs).encode("utf-8")).hexdigest()
  return _cached_tokens(data, "pydoc", {"content": digest}, lambda: docs, len(docs), tokenizer)


def python_stdlib_files() -> list[str]:
  """The `*.py` files of this Python's standard library (no installed packages), sorted."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")
                     and not d.startswith("."))
    files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
  if not files:
    raise DataError(f"data.source='pystdlib': no *.py files under {root}")
  return sorted(files)


def stdlib_split(files: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
  """(train files, held-out files), both in sorted order: the held-out ones are the
  ceil(eval_fraction * len(files)) files first in the order of the SHA-256 of their path relative
  to the stdlib folder, so the choice is spread over the library (not its alphabetical tail) and
  the same on every install of a Python version."""
  root = sysconfig.get_paths()["stdlib"]
  rank = sorted(files, key=lambda f: hashlib.sha256(
      os.path.relpath(f, root).replace(os.sep, "/").encode("utf-8")).hexdigest())
  held_out = set(rank[:max(1, math.ceil(eval_fraction * len(files)))])
  return [f for f in files if f not in held_out], [f for f in files if f in held_out]


def _text_documents(path: str, text_field: str) -> Iterator[str | None]:
  """The file's text as one document; None when it is binary or not UTF-8 (skipped)."""
  text = read_text_file(path)
  if text != "":
    yield text


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
  """The string `text_field` of every line's JSON object (blank lines skipped)."""
  with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz")
        else open(path, encoding="utf-8")) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as err:
        raise DataError(f"{where}: not a JSON object ({err.msg})") from None
      if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no data.text_field={text_field!r} in the record (it has "
                        f"{keys})")
      text = record[text_field]
      if not isinstance(text, str):
        raise DataError(f"{where}: data.text_field={text_field!r} is a "
                        f"{type(text).__name__}, not a string")
      if text:
        yield text


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
  """The string column `text_field` of the file, row by row, a record batch at a time."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    parquet = pq.ParquetFile(path)
  except (OSError, pa.ArrowException) as err:
    raise DataError(f"{path}: not a Parquet file ({str(err).splitlines()[0]})") from None
  schema = parquet.schema_arrow
  if text_field not in schema.names:
    raise DataError(f"{path}: no column data.text_field={text_field!r} (columns: "
                    f"{', '.join(schema.names)})")
  kind = schema.field(text_field).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise DataError(f"{path}: column data.text_field={text_field!r} has type {kind}, not string")
  for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
    yield from (text for text in batch.column(0).to_pylist() if text)


# data.source -> (the file name endings read from a folder, None = every file; the documents of
# one file, given the file and data.text_field).
_FILE_READERS = {"text": (None, _text_documents),
                 "jsonl": ((".jsonl", ".jsonl.gz"), _jsonl_documents),
                 "parquet": ((".parquet",), _parquet_documents)}


def _file_tokens(data, tokenizer: Tokenizer, label: str, files: list[str],
                 read: Callable[[str, str], Iterable[str | None]], *, where: str) -> TokenSpan:
  """The documents `read(file, data.text_field)` gives for each of `files` (data.path's or
  data.eval_path's, or the stdlib's for "pystdlib"; a None document marks a skipped file);
  `where` names the setting in errors."""
  if not files:
    raise DataError(f"{where}: no files in this folder")
  root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
  # File stats in the key: editing, adding or removing a file re-tokenizes.
  stats = []
  for f in files:
    st = os.stat(f)
    stats.append((os.path.relpath(f, root), st.st_size, st.st_mtime_ns))
  key = {"path": os.path.realpath(root), "files": stats}
  if label != "text" and label != "pystdlib":
    key["text_field"] = data.text_field

  def documents() -> Iterator[str]:
    skipped, produced = [], 0
    for f in files:
      for text in read(f, data.text_field):
        if text is None:
          skipped.append(f)
        else:
          produced += 1
          yield text
    if not produced:
      raise DataError(f"{where}: no non-empty UTF-8 text in its {len(files)} files, e.g. "
                      f"{files[0]!r}")
    if skipped:
      logging.warning("%s: skipped %d binary or non-UTF-8 files, e.g. %r", root, len(skipped),
                      skipped[0])

  # Documents to expect (the progress bar's total): one per file of text, unknown for records.
  num_docs = len(files) if read is _text_documents else None
  return _cached_tokens(data, label, key, documents, num_docs, tokenizer)


def _datasets_tokens(data, tokenizer: Tokenizer, path: str, split: str, *,
                     where: str) -> TokenSpan:
  """Column data.text_field of a `save_to_disk` folder (a DatasetDict's `split`)."""
  import datasets

  try:
    dataset = datasets.load_from_disk(path)
  except (FileNotFoundError, ValueError) as err:
    raise DataError(f"{where}: not a folder written by datasets' save_to_disk "
                    f"({str(err).splitlines()[0]})") from None
  if isinstance(dataset, datasets.DatasetDict):
    if split not in dataset:
      raise DataError(f"{where}: a DatasetDict without a {split!r} split (it has "
                      f"{', '.join(dataset)})")
    dataset = dataset[split]
  if data.text_field not in dataset.column_names:
    raise DataError(f"{where}: no column data.text_field={data.text_field!r} (columns: "
                    f"{', '.join(dataset.column_names)})")
  dataset = dataset.select_columns([data.text_field])
  files = sorted(os.path.relpath(os.path.join(root, n), path)
                 for root, _, names in os.walk(path) for n in names)
  key = {"path": os.path.realpath(path), "split": split, "text_field": data.text_field,
         "files": [(f, os.stat(os.path.join(path, f)).st_size,
                    os.stat(os.path.join(path, f)).st_mtime_ns) for f in files]}

  def documents() -> Iterator[str]:
    for batch in dataset.iter(batch_size=1024):
      yield from (text for text in batch[data.text_field] if text)

  return _cached_tokens(data, "datasets", key, documents, len(dataset), tokenizer)


def _tfds_tokens(data, split: str, tokenizer: Tokenizer) -> TokenSpan:
  import tensorflow_datasets as tfds

  import drt_jax.data.text_files_tfds  # noqa: F401  registers "drt_text_files" with TFDS

  name = data.tfds_name
  try:
    # download=False: a missing dataset is an error to report, never a multi-hour download.
    source = tfds.data_source(name, split=split, data_dir=data.tfds_data_dir or None,
                              download=False)
  except Exception as err:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    raise DataError(f"data.tfds_name={name!r} (data.tfds_data_dir={data.tfds_data_dir!r}): "
                    f"cannot open split {split!r}: {reason}") from None
  info = source.dataset_info
  feature = next((f for f in TFDS_TEXT_FEATURES if f in info.features), None)
  if feature is None:
    raise DataError(f"data.tfds_name={name!r}: no text feature among {sorted(info.features)}, "
                    f"expected one of {TFDS_TEXT_FEATURES}")
  key = {"data_dir": str(info.data_dir), "split": split, "feature": feature,
         "examples": len(source)}

  def documents() -> Iterator[str]:
    for i in range(len(source)):
      text = source[i][feature]
      text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
      if text:
        yield text

  label = f"tfds-{re.sub(r'[^A-Za-z0-9]+', '_', name)}-{split}"
  return _cached_tokens(data, label, key, documents, len(source), tokenizer)


def _cached_tokens(data, label: str, key: dict, documents: Callable[[], Iterable[str]],
                   num_docs: int | None, tokenizer: Tokenizer) -> TokenSpan:
  """The token file for `key`, written first (from `documents()`) if the cache lacks it.

  num_docs: documents to expect, for the progress bar (None: unknown). In a run of several
  processes only process 0 writes it; the others wait for it (_wait_for_process_zero).
  """
  dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
  full_key = {"version": _CACHE_VERSION, "label": label, "tokenizer": tokenizer.fingerprint, **key}
  digest = hashlib.sha256(json.dumps(full_key, sort_keys=True).encode("utf-8")).hexdigest()[:24]
  cache_dir = os.path.expanduser(data.cache_dir or DEFAULT_CACHE_DIR)
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f"{label}-{digest}.{dtype}")
  if not os.path.exists(path):
    if _process_index() == 0 or not _wait_for_process_zero(path):
      _write_tokens(path, documents, num_docs, tokenizer, dtype, label)
  size = os.path.getsize(path) // np.dtype(dtype).itemsize
  return TokenSpan(path=path, dtype=dtype, start=0, stop=size)


def _process_index() -> int:
  import jax

  return jax.process_index()


def _wait_for_process_zero(path: str) -> bool:
  """Waits while process 0 writes `path` (it holds `path`.claim meanwhile); True once the file is
  there. False when the claim disappears without it (process 0 failed: this process then tokenizes
  and meets the same error) or when neither shows up within _CLAIM_GRACE_S (the cache folder is not
  shared between the processes)."""
  claim, start, seen_claim, said = path + ".claim", time.monotonic(), False, 0.0
  while not os.path.exists(path):
    if os.path.exists(claim):
      seen_claim = True
      if time.monotonic() - said > 60:
        logging.info("waiting for process 0 to tokenize %s", path)
        said = time.monotonic()
    elif seen_claim or time.monotonic() - start > _CLAIM_GRACE_S:
      if not seen_claim:
        logging.warning("%s: process 0 did not start writing it within %.0f s; tokenizing here "
                        "(is data.cache_dir shared by all processes?)", path, _CLAIM_GRACE_S)
      return os.path.exists(path)
    time.sleep(_POLL_S)
  return True


def _write_tokens(path: str, documents: Callable[[], Iterable[str]], num_docs: int | None,
                  tokenizer: Tokenizer, dtype: str, label: str) -> None:
  """Streams tokenized documents to `path`; written under a temporary name then renamed, so a
  crash or a concurrent process never leaves a partial file under the final name. `path`.claim
  exists meanwhile (other processes of the run wait while it does)."""
  eos = np.array([tokenizer.eos_id], dtype).tobytes()
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
  claim = path + ".claim"
  total = 0
  with open(claim, "w") as f:
    f.write(f"{socket.gethostname()} pid {os.getpid()}\n")
  try:
    documents = documents()
    if num_docs is None or num_docs >= _PROGRESS_MIN_DOCS:
      import tqdm

      documents = tqdm.tqdm(documents, total=num_docs, desc=f"tokenizing {label}", unit="doc",
                            mininterval=10)
    with open(tmp, "wb") as f:
      it = iter(documents)
      while batch := list(itertools.islice(it, _ENCODE_BATCH)):
        for ids in tokenizer.encode_batch(batch):
          f.write(ids.astype(dtype).tobytes() + eos)
          total += len(ids) + 1
    if total == 0:
      raise DataError(f"{label}: the corpus is empty (no non-empty documents)")
    os.replace(tmp, path)
  finally:
    for name in (tmp, claim):
      if os.path.exists(name):
        os.remove(name)
