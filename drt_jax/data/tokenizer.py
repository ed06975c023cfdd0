"""Tokenizers: UTF-8 bytes, or any local HuggingFace `tokenizers` JSON file.

Neither adds BOS/EOS when encoding (as the reference's GPT-2 tokenizer, docs/specification.md
§1.1); sources.py appends `eos_id` after every document. A HuggingFace tokenizer's vocabulary size
and end-of-text token come from its files (model.vocab_size=0 takes that size). The model adds its
own landmark embedding, so no landmark id is reserved here.
"""

import hashlib
import json
import os
from typing import Protocol, Sequence

import numpy as np

from drt_jax.data import DataError

# Tried in order to find the end-of-document id of a HuggingFace tokenizer whose folder has no
# tokenizer_config.json naming its eos_token: GPT-2 family, then Llama/T5/BART family, then Gemma
# family, then Llama 3.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
TOKENIZER_CONFIG = "tokenizer_config.json"  # beside tokenizer.json in a HuggingFace model folder


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
  """A HuggingFace `tokenizers` JSON file. eos is the `eos_token` of the tokenizer_config.json
  beside it, if there is one, else the first of EOS_TOKENS in its vocabulary."""

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
    eos = _configured_eos(path)
    if eos is not None and self._tok.token_to_id(eos) is None:
      raise DataError(f"tokenizer {path!r}: its {TOKENIZER_CONFIG} names eos_token {eos!r}, "
                      "which is not in its vocabulary")
    if eos is None:
      eos = next((t for t in EOS_TOKENS if self._tok.token_to_id(t) is not None), None)
    if eos is None:
      raise DataError(f"tokenizer {path!r}: no end-of-document token: no {TOKENIZER_CONFIG} "
                      f"eos_token beside it and none of {EOS_TOKENS} in its vocabulary")
    self.eos_id = self._tok.token_to_id(eos)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size]
    return self._tok.decode(ids, skip_special_tokens=True)


def _configured_eos(path: str) -> str | None:
  """The eos_token of the tokenizer_config.json in `path`'s folder, if it names one."""
  config_path = os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_CONFIG)
  if not os.path.isfile(config_path):
    return None
  try:
    with open(config_path, encoding="utf-8") as f:
      eos = json.load(f).get("eos_token")
  except (OSError, ValueError, AttributeError) as err:
    raise DataError(f"{config_path}: not a tokenizer config JSON object ({err})") from None
  if isinstance(eos, dict):  # an AddedToken written out: {"content": ..., ...}
    eos = eos.get("content")
  return eos if isinstance(eos, str) and eos else None


def make_tokenizer(name_or_path: str) -> Tokenizer:
  """"byte" -> ByteTokenizer; anything else is the path of a tokenizers JSON file."""
  if name_or_path == "byte":
    return ByteTokenizer()
  if not os.path.isfile(name_or_path):
    raise DataError(
        f"tokenizer {name_or_path!r}: no such file (use 'byte' or a tokenizers JSON path)")
  return HFTokenizer(name_or_path)
