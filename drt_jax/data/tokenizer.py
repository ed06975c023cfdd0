"""Tokenizers: UTF-8 bytes, or any local HuggingFace `tokenizers` JSON file.

Neither adds BOS/EOS when encoding (as the reference's GPT-2 tokenizer, REFERENCE_DRT.md §1.1);
sources.py appends `eos_id` after every document. The model adds its own landmark embedding, so no
landmark id is reserved here.
"""

import hashlib
import os
from typing import Protocol, Sequence

import numpy as np

from drt_jax.data import DataError

# Tried in order to find the end-of-document id of a HuggingFace tokenizer: GPT-2 family, then
# Llama/T5/BART family, then Gemma family.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


class Tokenizer(Protocol):
  vocab_size: int  # ids lie in [0, vocab_size)
  eos_id: int  # appended after every document
  fingerprint: str  # stable id of the vocabulary, part of the token cache key

  def encode(self, text: str) -> np.ndarray:
    """Returns int32 [n] ids, no special tokens added."""

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` over many texts (parallel where the backend allows)."""

  def decode(self, ids) -> str:
    """Text of ids; special ids (eos, ids >= vocab) are dropped."""


class ByteTokenizer:
  """Ids 0..255 are UTF-8 bytes, 256 is eos."""

  vocab_size = 257
  eos_id = 256
  fingerprint = "byte"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    # Models with a larger embedding (vocab_size 259) can sample ids >= 256: they are not bytes.
    data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")


class HFTokenizer:
  """A HuggingFace `tokenizers` JSON file; eos is the first of EOS_TOKENS in its vocabulary."""

  def __init__(self, path: str):
    import tokenizers  # Only this class needs it; the GPU image may not ship it.

    try:
      with open(path, "rb") as f:
        raw = f.read()
      self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as err:  # OSError, UnicodeDecodeError, or the Rust parser's plain Exception.
      reason = str(err).splitlines()[0] if str(err) else type(err).__name__
      raise DataError(
          f"tokenizer {path!r}: not a HuggingFace tokenizers JSON file ({reason})") from None
    self.path = path
    self.vocab_size = self._tok.get_vocab_size()
    self.fingerprint = "hf-" + hashlib.sha256(raw).hexdigest()
    eos = next((t for t in EOS_TOKENS if self._tok.token_to_id(t) is not None), None)
    if eos is None:
      raise DataError(f"tokenizer {path!r}: no end-of-document token, expected one of {EOS_TOKENS}")
    self.eos_id = self._tok.token_to_id(eos)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size]
    return self._tok.decode(ids, skip_special_tokens=True)


def make_tokenizer(name_or_path: str) -> Tokenizer:
  """"byte" -> ByteTokenizer; anything else is the path of a tokenizers JSON file."""
  if name_or_path == "byte":
    return ByteTokenizer()
  if not os.path.isfile(name_or_path):
    raise DataError(
        f"tokenizer {name_or_path!r}: no such file (use 'byte' or a tokenizers JSON path)")
  return HFTokenizer(name_or_path)
