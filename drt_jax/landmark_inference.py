"""Incremental Landmark Attention decoding (inference.py's Decoder / Session interface).

The state of a batch of sequences is LandmarkLM's "cache" collection: per layer, the rotated keys
and the values of every finished block (up to max_len / chunk_len blocks, on the device) and the
rows of the current block. Each query keeps its top-k earlier blocks (model.topk, LandmarkLM's
inference rule), so the hidden state of every token equals the one-shot forward's
`model.apply(params, tokens, train=False)` (docs/design.md, "Landmark Attention").

Segments are whole blocks from a block boundary; single tokens are steps, and a block's landmark
row runs right after its last token.
"""

import functools

import jax
import jax.numpy as jnp

from drt_jax import inference
from drt_jax.config import ModelConfig
from drt_jax.model.drt import drop_landmarks
from drt_jax.model.landmark import LandmarkLM


def _model(config: ModelConfig, mode: str, capacity: int) -> LandmarkLM:
  return LandmarkLM(config, mode, capacity)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _token_step(config: ModelConfig, capacity: int, params, cache, tokens, rows):
  """One token per sequence (int [b]) -> (final-normed hidden [b, d], cache); the caches change
  only where rows (inference.keep_rows)."""
  def run(m):
    return m.finish(m.layers(m.token_row(tokens), config.topk))[:, 0]

  hidden, variables = _model(config, "step", capacity).apply(
      {"params": params, "cache": cache}, method=run, mutable=["cache"])
  return hidden, inference.keep_rows(rows, variables["cache"], cache)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _landmark_step(config: ModelConfig, capacity: int, params, cache, closes):
  """The landmark row of the sequences where closes (bool [b]); the others' caches unchanged."""
  def run(m):
    return m.layers(m.landmark_row(closes.shape[0]), config.topk)

  _, variables = _model(config, "step", capacity).apply(
      {"params": params, "cache": cache}, method=run, mutable=["cache"])

  return inference.keep_rows(closes, variables["cache"], cache)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _segment(config: ModelConfig, capacity: int, params, cache, tokens, rows):
  """Whole blocks (int [b, n * chunk_len]) -> (hidden [b, n * chunk_len, d], cache); the
  sequences where rows (inference.keep_rows) at one block boundary."""
  def run(m):
    return drop_landmarks(m.finish(m.layers(m.chunk_rows(tokens), config.topk)),
                          config.chunk_size)

  hidden, variables = _model(config, "segment", capacity).apply(
      {"params": params, "cache": cache}, method=run, mutable=["cache"])
  return hidden, inference.keep_rows(rows, variables["cache"], cache)


class LandmarkSession(inference.CachedSession):
  """Landmark sequences: the model's "cache" collection, one block memory per layer."""

  def _step(self, tokens, rows):
    d = self.decoder
    hidden, self.cache = _token_step(d.config, d.capacity, d.params, self.cache, tokens,
                                     inference.device_rows(rows))
    self._advance(1, rows)
    closes = self.lengths % d.config.chunk_len == 0
    if rows is not None:
      closes &= rows  # a sequence left out may sit at a block boundary: its landmark has run
    if closes.any():
      self.cache = _landmark_step(d.config, d.capacity, d.params, self.cache,
                                  jnp.asarray(closes))
    return hidden

  def _segment(self, tokens, rows):
    d = self.decoder
    hidden, self.cache = _segment(d.config, d.capacity, d.params, self.cache,
                                  jnp.asarray(tokens, jnp.int32), inference.device_rows(rows))
    self._advance(tokens.shape[1], rows)
    return hidden


class LandmarkDecoder(inference.CachedDecoder):
  """Decoding of model.arch="landmark": per layer the keys/values of every finished block, so
  the memory is max_len / chunk_len blocks per layer, on the device."""
  session_class = LandmarkSession

  @property
  def capacity(self) -> int:
    """Blocks a sequence may finish: one per chunk_len of max_len."""
    return -(-self.max_len // self.config.chunk_len)

  def initial_cache(self, batch: int):
    c = self.config

    def touch(m):
      return m.layers(m.token_row(jnp.zeros((batch,), jnp.int32)), c.topk)

    shapes = jax.eval_shape(lambda p: _model(c, "step", self.capacity).apply(
        {"params": p}, method=touch, mutable=["cache"])[1]["cache"], self.params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
