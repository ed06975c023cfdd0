"""DRT applied one piece at a time, for incremental inference (the state lives in inference.py).

DecodeDRT builds exactly DRT's parameter tree from the same submodules (blocks, chunk encoder,
norms, GCA), so a training checkpoint applies unchanged; its methods are the pieces of DRT.__call__
that inference runs separately: rows -> lower layers -> chunk encoding -> per group: retrieval
queries (inference.py scores them against the landmark keys), upper layers -> final norm. The one
new module is CachedSelfAttention, which keeps each self-attention layer's last `window + 1`
keys/values in a ring buffer (flax collection "cache"): position p of the landmark-inserted stream
lives in slot p % (window + 1).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from drt_jax.config import ModelConfig
from drt_jax.model import attention
from drt_jax.model import layers
from drt_jax.model import retrieval as retrieval_ops
from drt_jax.model.blocks import DecoderBlock, UpperBlock
from drt_jax.model.drt import insert_landmarks, token_embedding
from drt_jax.model.encoder import ChunkMemory
from kernels_pallas import sliding_window as sliding_window_ops


def cache_len(config: ModelConfig) -> int:
  """Ring-buffer slots per self-attention layer: the query's own position and `window` before it."""
  return config.window + 1


def _rows_by_position(ring, first):
  """ring [b, n, ...] (position p in slot p % n) -> [b, n, ...], positions first .. first + n - 1.

  first: int [b]. Slots of positions never written hold zeros or stale rows: callers drop them.
  """
  n = ring.shape[1]
  slots = jnp.remainder(first[:, None] + jnp.arange(n)[None, :], n)
  return jnp.take_along_axis(ring, slots.reshape(slots.shape + (1,) * (ring.ndim - 2)), axis=1)


def _to_ring(chronological, end, n: int):
  """The last n rows of `chronological` [b, t, ...] (positions end - t .. end - 1) as a ring of n
  slots; rows before position end - t (t < n) are zero."""
  if chronological.shape[1] < n:
    pad = [(0, 0)] * chronological.ndim
    pad[1] = (n - chronological.shape[1], 0)
    chronological = jnp.pad(chronological, pad)
  last = chronological[:, -n:]  # positions end - n .. end - 1
  slots = jnp.remainder(jnp.arange(n)[None, :] - (end[:, None] - n), n)
  return jnp.take_along_axis(last, slots.reshape(slots.shape + (1,) * (last.ndim - 2)), axis=1)


class CachedSelfAttention(nn.Module):
  """SlidingWindowSelfAttention's params and function, over a ring-buffer KV cache.

  mode "step": x [b, 1, d_model], one new row per sequence, each at its own position.
  mode "segment": x [b, rows, d_model], rows continuing every sequence at the same position;
    the rows attend to the `history` cached positions before them (history = min(position,
    window + 1), static, so no slot that was never written is read).
  Returns the compute dtype [b, rows, d_model] and advances the cache.
  """
  config: ModelConfig
  mode: str
  history: int = 0

  @nn.compact
  def __call__(self, x):
    c = self.config
    batch, rows, _ = x.shape
    size = cache_len(c)
    q = layers.head_projection(c, c.num_heads, "q")(x)
    k = layers.head_projection(c, c.num_kv_heads, "k")(x)
    v = layers.head_projection(c, c.num_kv_heads, "v")(x)
    shape = (batch, size, c.num_kv_heads, c.head_dim)
    k_cache = self.variable("cache", "cached_k", jnp.zeros, shape, k.dtype)
    v_cache = self.variable("cache", "cached_v", jnp.zeros, shape, v.dtype)
    position = self.variable("cache", "position", jnp.zeros, (batch,), jnp.int32)
    slopes = (jnp.asarray(sliding_window_ops.alibi_slopes(c.num_heads), jnp.float32)
              if c.use_alibi else None)
    scale = c.head_dim ** -0.5
    p = position.value
    if self.mode == "step":
      slot = (jnp.arange(batch), jnp.remainder(p, size))
      k_cache.value = k_cache.value.at[slot].set(k[:, 0])
      v_cache.value = v_cache.value.at[slot].set(v[:, 0])
      out = attention.sliding_window_decode(
          q[:, 0], k_cache.value, v_cache.value, slopes, window=c.window, scale=scale,
          position=p, impl=c.impl)[:, None]
    else:
      h = self.history
      past = lambda cache: _rows_by_position(cache, p - size)[:, size - h:]  # noqa: E731
      keys = jnp.concatenate([past(k_cache.value), k], axis=1)
      values = jnp.concatenate([past(v_cache.value), v], axis=1)
      # History rows get zero queries: their outputs are dropped, only their keys matter.
      queries = jnp.pad(q, ((0, 0), (h, 0), (0, 0), (0, 0)))
      out = attention.sliding_window(queries, keys, values, slopes, window=c.window, scale=scale,
                                     impl=c.impl)[:, h:]
      k_cache.value = _to_ring(keys, p + rows, size)
      v_cache.value = _to_ring(values, p + rows, size)
    position.value = p + rows
    return layers.output_projection(c, "o")(out)


class DecodeDRT(nn.Module):
  """DRT's parameters, with methods for the pieces inference runs one at a time.

  Shapes: b batch, n chunks, S = chunk_len + 1 rows per chunk, d = d_model, m memory chunks,
  K retrieved chunks. Chunk keys/values are stored and fetched stacked, kv [b, m, S, 2, heads,
  head_dim]; the upper layers take them apart, k and v [b, m, S, heads, head_dim], because a slice
  of the stacked axis inside a jitted piece is a copy of the whole buffer.
  """
  config: ModelConfig
  mode: str  # "step" or "segment", see CachedSelfAttention
  history: int = 0

  def setup(self):
    c = self.config
    cached = functools.partial(CachedSelfAttention, mode=self.mode, history=self.history)
    self.embed = token_embedding(c)
    self.landmark = self.param("landmark", layers.normal_init(c, ("embed",)), (c.d_model,),
                               jnp.float32)
    self.lower = [DecoderBlock(c, cached) for _ in range(c.decoder_layers[0])]
    self.memory = ChunkMemory(c)
    self.lmk_norm = [layers.RMSNorm(c.rms_eps) for _ in range(c.num_groups)]
    self.group = [[UpperBlock(c, cached) for _ in range(n)] for n in c.decoder_layers[1:]]
    self.final_norm = layers.RMSNorm(c.rms_eps)

  def chunk_rows(self, tokens):
    """int [b, n * chunk_len] from a chunk boundary -> [b, n * S, d], a landmark per chunk."""
    c = self.config
    batch, length = tokens.shape
    x = self.embed(tokens).reshape(batch, length // c.chunk_len, c.chunk_len, c.d_model)
    return insert_landmarks(x, self.landmark)

  def token_row(self, tokens):
    """int [b] -> [b, 1, d]."""
    return self.embed(tokens)[:, None]

  def landmark_row(self, batch: int):
    """[b, 1, d]: the learned landmark vector."""
    return jnp.broadcast_to(self.landmark, (batch, 1, self.config.d_model))

  def lower_layers(self, x):
    for block in self.lower:
      x = block(x)
    return x

  def encode(self, rows):
    """Lower-layer rows of whole chunks [b, n, S, d] -> landmark keys f32 [b, n, d], kv."""
    keys, k_mem, v_mem = self.memory(rows)
    return keys, jnp.stack([k_mem, v_mem], axis=3)

  def retrieval_queries(self, group: int, landmark_rows):
    """Group `group`'s landmark queries: landmark_rows [b, n, d] (hidden state at the group's
    start) -> f32 [b, n, d], what DRT.retrieve scores against the landmark keys."""
    return self.lmk_norm[group](landmark_rows)

  def upper_layers(self, group: int, x, k, v, serving: retrieval_ops.Retrieval):
    """Group `group`'s upper blocks over chunk keys and values k, v [b, m, S, heads, head_dim];
    serving indexes their m axis."""
    for block in self.group[group]:
      x = block(x, k, v, serving)
    return x

  def finish(self, x):
    return self.final_norm(x)


def init_cache(config: ModelConfig, params, batch: int):
  """Zero ring buffers ("cache" collection) for `batch` sequences at position 0."""
  module = DecodeDRT(config, "step")

  def touch(m):
    x = m.lower_layers(m.token_row(jnp.zeros((batch,), jnp.int32)))
    chunk = jnp.zeros((batch, 1, config.chunk_size, config.num_heads, config.head_dim),
                      config.compute_dtype)  # its keys and its values
    serving = retrieval_ops.Retrieval(jnp.zeros((batch, 1, 1), jnp.int32),
                                      jnp.zeros((batch, 1, 1)), jnp.zeros((batch, 1, 1), bool))
    for g in range(config.num_groups):
      x = m.upper_layers(g, x, chunk, chunk, serving)
    return x

  shapes = jax.eval_shape(
      lambda p: module.apply({"params": p}, method=touch, mutable=["cache"])[1]["cache"], params)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
