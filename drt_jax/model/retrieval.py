"""Causal chunk retrieval: scores, validity mask, Gumbel top-k and relevance weights (§2.5).

Chunk j's landmark query scores every strictly earlier chunk i < j; the top-k serve the tokens of
chunk j + 1 (its own predecessor j is inside the sliding window). Training adds Gumbel noise to the
scores for the *selection* only (Gumbel top-k = sampling k chunks without replacement from
softmax(scores)); the mixing weights are the softmax of the noise-free scores of the chosen chunks,
so the LM loss reaches the scores, the landmark queries and the landmark keys through them.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Retrieval(NamedTuple):
  """Which memory chunks each query chunk attends to. All [batch, chunks, k]."""
  indices: jax.Array  # int32 memory chunk ids; 0 in invalid slots
  weights: jax.Array  # float32 mixing weights; 0 in invalid slots
  valid: jax.Array  # bool: the slot holds a real earlier chunk


def chunk_scores(queries, keys):
  """<q_j, l_i> / sqrt(d_model). queries, keys [batch, chunks, d_model] -> f32 [batch, q, k]."""
  scale = queries.shape[-1] ** -0.5
  return jnp.einsum("bjd,bid->bji", queries.astype(jnp.float32), keys.astype(jnp.float32)) * scale


def causal_chunk_mask(num_queries: int, num_keys: int, query_offset: int = 0):
  """[q, k] bool: key chunk i is visible to query chunk j iff i < j (global ids j = offset + row)."""
  rows = jnp.arange(num_queries)[:, None] + query_offset
  return jnp.arange(num_keys)[None, :] < rows


def select_chunks(scores, mask, topk: int, ranking=None) -> Retrieval:
  """Top-k of the masked ranking, and softmax weights of the chosen chunks' scores.

  scores: f32 [batch, q, k]; mask: bool broadcastable to scores; ranking: what the top-k ranks
  (default the scores; scores + Gumbel noise in training; noise alone for random retrieval).
  Slots beyond a row's number of visible chunks are invalid: weight 0, index 0, no gradient.
  """
  k = min(topk, scores.shape[-1])
  ranking = scores if ranking is None else ranking
  ranking = jnp.where(mask, jax.lax.stop_gradient(ranking), -jnp.inf)
  _, indices = jax.lax.top_k(ranking, k)
  visible = jnp.sum(jnp.broadcast_to(mask, scores.shape), axis=-1, keepdims=True)
  valid = jnp.arange(k) < visible
  indices = jnp.where(valid, indices, 0).astype(jnp.int32)
  chosen = jnp.take_along_axis(scores, indices, axis=-1)
  chosen = jnp.where(valid, chosen, -jnp.inf)
  safe_max = jnp.where(jnp.any(valid, axis=-1, keepdims=True),
                       jnp.max(chosen, axis=-1, keepdims=True), 0.0)
  exp = jnp.where(valid, jnp.exp(chosen - jax.lax.stop_gradient(safe_max)), 0.0)
  weights = exp / jnp.maximum(jnp.sum(exp, axis=-1, keepdims=True), 1e-30)
  return Retrieval(indices, weights, valid)


def gumbel_noise(rng, shape):
  """Standard Gumbel(0, 1) noise, -log(Exp(1)), in float32."""
  return jax.random.gumbel(rng, shape, jnp.float32)


def shift_to_next_chunk(retrieval: Retrieval) -> Retrieval:
  """Retrieval computed at chunk j's landmark serves chunk j + 1; chunk 0 gets no valid slot."""
  def shift(x, fill):
    return jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)
  return Retrieval(shift(retrieval.indices, 0), shift(retrieval.weights, 0.0),
                   shift(retrieval.valid, False))
