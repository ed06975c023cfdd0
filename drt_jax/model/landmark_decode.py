"""Incremental Landmark Attention decoding: prompts of any length, then token-by-token steps.

The state of a batch of sequences is LandmarkLM's "cache" collection: per layer, the rotated keys
and the values of every finished block (up to the capacity max_len / chunk_len blocks) and the
rows of the current block. Each query keeps its top-k earlier blocks (model.topk, the inference
rule of LandmarkLM with train=False), so the hidden state of every token equals the one-shot
forward's `model.apply(params, tokens, train=False)`.

Tokens go in as segments of whole blocks (every sequence at the same block boundary) or one at a
time (a block's landmark row runs right after its last token).
"""

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.config import ConfigError, ModelConfig
from drt_jax.model.drt import drop_landmarks
from drt_jax.model.head import tied_logits
from drt_jax.model.landmark import LandmarkLM


class InputError(ValueError):
  """Tokens a session cannot take (empty, too long, misaligned); the message names the value."""


def _model(config: ModelConfig, mode: str, capacity: int) -> LandmarkLM:
  return LandmarkLM(config, mode=mode, capacity=capacity)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _initial_cache(config: ModelConfig, capacity: int, batch: int, params):
  def touch(m):
    return m.layers(m.token_row(jnp.zeros((batch,), jnp.int32)), config.topk)

  shapes = jax.eval_shape(lambda p: _model(config, "step", capacity).apply(
      {"params": p}, method=touch, mutable=["cache"])[1]["cache"], params)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _token_step(config: ModelConfig, capacity: int, params, cache, tokens):
  """One token per sequence (int [b]) -> (final-normed hidden [b, d], cache)."""
  def run(m):
    return m.finish(m.layers(m.token_row(tokens), config.topk))[:, 0]

  hidden, variables = _model(config, "step", capacity).apply(
      {"params": params, "cache": cache}, method=run, mutable=["cache"])
  return hidden, variables["cache"]


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _landmark_step(config: ModelConfig, capacity: int, params, cache, closes):
  """The landmark row of the sequences where closes (bool [b]); the others' caches unchanged."""
  def run(m):
    return m.layers(m.landmark_row(closes.shape[0]), config.topk)

  _, variables = _model(config, "step", capacity).apply(
      {"params": params, "cache": cache}, method=run, mutable=["cache"])

  def pick(new, old):
    return jnp.where(closes.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  return jax.tree.map(pick, variables["cache"], cache)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _segment(config: ModelConfig, capacity: int, params, cache, tokens):
  """Whole blocks (int [b, n * chunk_len]) -> (hidden [b, n * chunk_len, d], cache)."""
  def run(m):
    return drop_landmarks(m.finish(m.layers(m.block_rows(tokens), config.topk)),
                          config.chunk_size)

  hidden, variables = _model(config, "segment", capacity).apply(
      {"params": params, "cache": cache}, method=run, mutable=["cache"])
  return hidden, variables["cache"]


class Decoder:
  """A landmark model's compiled inference pieces, shared by the sessions it starts.

  Args:
    config: the model (arch "landmark").
    params: its float32 params (unboxed), as trained.
    max_len: the most tokens a sequence may hold (prompt + generated); sizes the block memory.
    segment_len: tokens per batch-mode segment when feeding long inputs, a multiple of chunk_len.
  """

  def __init__(self, config: ModelConfig, params, *, max_len: int, segment_len: int):
    if config.arch != "landmark":
      raise ConfigError(f"model.arch={config.arch!r}: this decoder needs 'landmark'")
    if not isinstance(max_len, int) or max_len < 1:
      raise ConfigError(f"max_len={max_len!r}: must be a positive integer")
    c = config.chunk_len
    if not isinstance(segment_len, int) or segment_len < c or segment_len % c:
      raise ConfigError(f"segment_len={segment_len!r}: must be a positive multiple of "
                        f"model.chunk_len={c}")
    self.config = config
    self.params = params
    self.max_len = max_len
    self.segment_len = segment_len
    self.capacity = -(-max_len // c)  # blocks

  def start(self, batch: int, chunk_memory: str = "device") -> "Session":
    """A session of `batch` empty sequences. Landmark attention reads every block's keys at every
    row, so its memory stays on the device: chunk_memory must be "device"."""
    if chunk_memory != "device":
      raise ConfigError(f"chunk_memory={chunk_memory!r}: model.arch='landmark' keeps its block "
                        "memory on the device; must be 'device'")
    return Session(self, batch)

  def logits(self, hidden):
    """hidden [..., d] -> float32 [..., vocab] (the tied head)."""
    return tied_logits(hidden, self.params["embed"]["embedding"], self.config.compute_dtype)


class Session:
  """The inference state of `batch` sequences. Not thread-safe; one decoder, many sessions."""

  def __init__(self, decoder: Decoder, batch: int):
    self.decoder = decoder
    self.batch = batch
    self.lengths = np.zeros(batch, np.int64)  # tokens fed per sequence, known without a sync
    self.cache = _initial_cache(decoder.config, decoder.capacity, batch, decoder.params)

  @classmethod
  def concatenate(cls, sessions) -> "Session":
    """One session holding the sequences of all `sessions` (one decoder), in order; they may be
    at different lengths. The sessions given are used up."""
    merged = cls.__new__(cls)
    merged.decoder = sessions[0].decoder
    merged.batch = sum(s.batch for s in sessions)
    merged.lengths = np.concatenate([s.lengths for s in sessions])
    merged.cache = jax.tree.map(lambda *xs: jnp.concatenate(xs), *(s.cache for s in sessions))
    return merged

  def feed(self, tokens) -> Iterator[tuple[int, jax.Array]]:
    """Feeds int [batch, n] tokens, every sequence at the same length.

    Returns an iterator of (offset, hidden [batch, m, d]): the final-normed hidden states of
    tokens offset .. offset + m - 1 of this call (row t predicts token t + 1), piece by piece;
    nothing is fed beyond what has been iterated. Inputs are checked at the call.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] != self.batch:
      raise InputError(f"tokens of shape {tokens.shape}: expected [batch={self.batch}, length]")
    if tokens.shape[1] == 0:
      raise InputError("empty input: at least one token is needed")
    if len(set(self.lengths.tolist())) != 1:
      raise InputError(f"sequences hold {sorted(set(self.lengths.tolist()))} tokens: feed needs "
                       "them all at one length (use step)")
    self._check_room(tokens.shape[1])
    return self._pieces(tokens)

  def prefill(self, tokens):
    """Feeds tokens (see feed); returns the hidden state of the last one, [batch, d]."""
    for _, hidden in self.feed(tokens):
      last = hidden[:, -1]
      del hidden
    return last

  def step(self, tokens):
    """One token per sequence (int [batch]) -> its hidden state [batch, d]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape != (self.batch,):
      raise InputError(f"tokens of shape {tokens.shape}: expected [batch={self.batch}]")
    self._check_room(1)
    d = self.decoder
    hidden, self.cache = _token_step(d.config, d.capacity, d.params, self.cache, tokens)
    self.lengths += 1
    closes = self.lengths % d.config.chunk_len == 0
    if closes.any():
      self.cache = _landmark_step(d.config, d.capacity, d.params, self.cache,
                                  jnp.asarray(closes))
    return hidden

  def _check_room(self, n: int):
    longest = int(self.lengths.max()) + n
    if longest > self.decoder.max_len:
      raise InputError(f"{longest} tokens: longer than max_len={self.decoder.max_len}")

  def _pieces(self, tokens):
    d = self.decoder
    c = d.config.chunk_len
    done, total = 0, tokens.shape[1]
    while done < total:
      whole = (total - done) // c * c
      if self.lengths[0] % c == 0 and whole:
        size = min(whole, d.segment_len)
        hidden, self.cache = _segment(d.config, d.capacity, d.params, self.cache,
                                      jnp.asarray(tokens[:, done:done + size], jnp.int32))
        self.lengths += size
      else:
        size = 1
        hidden = self.step(tokens[:, done])[:, None]
      yield done, hidden
      del hidden
      done += size
