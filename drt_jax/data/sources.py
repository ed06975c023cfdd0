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
  tfds   `data.tfds_name` through `tfds.data_source` (array_record, no tensorflow): "pg19" where the
         user has prepared it, or "drt_text_files" (text_files_tfds.py). The text feature is "text"
         or pg19's "book_text".
Empty documents are skipped. Document boundaries are kept only as eos tokens: training windows run
across them, as in the reference (REFERENCE_DRT.md §6 "Loading").

Tokens are stored as uint16 when the vocabulary fits (the reference's layout, half the disk and page
cache of uint32 on PG19-size corpora), else uint32, in a raw file under `data.cache_dir` named by a
hash of (source, path or name, split, file stats or content, tokenizer), and memory-mapped: restarts
and grain workers neither re-tokenize nor copy the corpus.

Held-out data: tfds uses the "validation" split; pystdlib holds out `data.eval_fraction` of its
files (stdlib_split); pydoc and text hold out the last `data.eval_fraction` of the token stream.
"""

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import sysconfig
import uuid
from typing import Callable, Iterable, Iterator

import numpy as np

from drt_jax.data import DataError
from drt_jax.data.tokenizer import Tokenizer

SOURCES = ("pydoc", "pystdlib", "text", "tfds")
TFDS_TRAIN_SPLIT = "train"
TFDS_EVAL_SPLIT = "validation"
TFDS_TEXT_FEATURES = ("text", "book_text")  # book_text: pg19
DEFAULT_CACHE_DIR = "~/.cache/drt_jax"
_CACHE_VERSION = 1  # part of every cache key: bump when tokenization or the file layout changes
_ENCODE_BATCH = 64  # documents per tokenizer call (HF tokenizers encode a batch in parallel)
_PROGRESS_MIN_DOCS = 1000  # a progress bar only from this many documents; fewer take seconds


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
    return Corpus(train=_file_tokens(data, tokenizer, "pystdlib", train_files, where=where),
                  eval=_file_tokens(data, tokenizer, "pystdlib-eval", eval_files, where=where))
  elif data.source == "text":
    stream = _file_tokens(data, tokenizer, "text", list_text_files(data.path),
                          where=f"data.path={data.path!r}")
  else:
    raise DataError(f"data.source={data.source!r}: must be one of {', '.join(map(repr, SOURCES))}")
  n_eval = int(len(stream) * data.eval_fraction)
  split = stream.stop - n_eval
  return Corpus(train=dataclasses.replace(stream, stop=split),
                eval=dataclasses.replace(stream, start=split))


def list_text_files(path: str) -> list[str]:
  """`path` itself if it is a file, else every non-hidden file below it, sorted."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise DataError(f"data.path={path!r}: no such file or folder")
  files = []
  for root, dirs, names in os.walk(path):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    files += [os.path.join(root, n) for n in names if not n.startswith(".")]
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


def _file_tokens(data, tokenizer: Tokenizer, label: str, files: list[str], *,
                 where: str) -> TokenSpan:
  """One document per file of `files` (data.path's for "text", the stdlib's for "pystdlib");
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

  def documents() -> Iterator[str]:
    skipped, produced = [], 0
    for f in files:
      text = read_text_file(f)
      if text is None:
        skipped.append(f)
      elif text:
        produced += 1
        yield text
    if not produced:
      raise DataError(f"{where}: no non-empty UTF-8 text in its {len(files)} files, e.g. "
                      f"{files[0]!r}")
    if skipped:
      logging.warning("%s: skipped %d binary or non-UTF-8 files, e.g. %r", root, len(skipped),
                      skipped[0])

  return _cached_tokens(data, label, key, documents, len(files), tokenizer)


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
                   num_docs: int, tokenizer: Tokenizer) -> TokenSpan:
  """The token file for `key`, written first (from `documents()`) if the cache lacks it."""
  dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
  full_key = {"version": _CACHE_VERSION, "label": label, "tokenizer": tokenizer.fingerprint, **key}
  digest = hashlib.sha256(json.dumps(full_key, sort_keys=True).encode("utf-8")).hexdigest()[:24]
  cache_dir = os.path.expanduser(data.cache_dir or DEFAULT_CACHE_DIR)
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f"{label}-{digest}.{dtype}")
  if not os.path.exists(path):
    _write_tokens(path, documents(), num_docs, tokenizer, dtype, label)
  size = os.path.getsize(path) // np.dtype(dtype).itemsize
  return TokenSpan(path=path, dtype=dtype, start=0, stop=size)


def _write_tokens(path: str, documents: Iterable[str], num_docs: int, tokenizer: Tokenizer,
                  dtype: str, label: str) -> None:
  """Streams tokenized documents to `path`; written under a temporary name then renamed, so a
  crash or a concurrent process never leaves a partial file under the final name."""
  if num_docs >= _PROGRESS_MIN_DOCS:
    import tqdm

    documents = tqdm.tqdm(documents, total=num_docs, desc=f"tokenizing {label}", unit="doc")
  eos = np.array([tokenizer.eos_id], dtype).tobytes()
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
  total = 0
  try:
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
    if os.path.exists(tmp):
      os.remove(tmp)
