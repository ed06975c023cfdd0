"""Causal chunk retrieval: scores, validity mask, Gumbel top-k and relevance weights (§2.5).

Chunk j's landmark query scores every strictly earlier chunk i < j; the top-k serve the tokens of
chunk j + 1 (its own predecessor j is inside the sliding window). Training adds Gumbel noise to the
scores for the *selection* only (Gumbel top-k = sampling k chunks without replacement from
softmax(scores)); the mixing weights are the softmax of the noise-free scores of the chosen chunks,
so the LM loss reaches the scores, the landmark queries and the landmark keys through them.
Random retrieval ranks by noise alone: fresh Gumbel noise in training, outside it a fixed function
of (group, query chunk, key chunk), inference_noise. Inference scores the landmark keys block by
block (they may live in host memory): merge_top_k keeps a running top-k that ends equal to
select_chunks on the whole array.
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


def causal_chunk_mask(query_chunks, key_chunks):
  """Chunk ids int [..., q] and [..., k] -> bool [..., q, k]: key chunk i is visible to query
  chunk j iff i < j."""
  return key_chunks[..., None, :] < query_chunks[..., :, None]


def select_chunks(scores, mask, topk: int, ranking=None) -> Retrieval:
  """Top-k of the masked ranking, and softmax weights of the chosen chunks' scores.

  scores: f32 [batch, q, k]; mask: bool broadcastable to scores; ranking: what the top-k ranks
  (default the scores; scores + Gumbel noise in training; noise alone for random retrieval).
  Slots beyond a row's number of visible chunks are invalid: weight 0, index 0, no gradient.
  """
  k = min(topk, scores.shape[-1])
  ranking = scores if ranking is None else ranking
  ranking = jnp.where(mask, jax.lax.stop_gradient(ranking), -jnp.inf)
  ranked, indices = jax.lax.top_k(ranking, k)
  return top_k_retrieval(ranked, indices, jnp.take_along_axis(scores, indices, axis=-1))


def top_k_retrieval(ranked, indices, chosen) -> Retrieval:
  """The Retrieval of a masked top-k (select_chunks, merge_top_k). All [..., k].

  ranked: the top-k values of the masked ranking, -inf where a row has fewer visible chunks than
  k (a visible chunk's ranking is finite); indices: their chunk ids; chosen: those chunks'
  noise-free scores. Weights are the softmax of `chosen` over the valid slots.
  """
  valid = ranked > -jnp.inf
  indices = jnp.where(valid, indices, 0).astype(jnp.int32)
  chosen = jnp.where(valid, chosen, -jnp.inf)
  safe_max = jnp.where(jnp.any(valid, axis=-1, keepdims=True),
                       jnp.max(chosen, axis=-1, keepdims=True), 0.0)
  exp = jnp.where(valid, jnp.exp(chosen - jax.lax.stop_gradient(safe_max)), 0.0)
  weights = exp / jnp.maximum(jnp.sum(exp, axis=-1, keepdims=True), 1e-30)
  return Retrieval(indices, weights, valid)


def merge_top_k(best, scores, mask, first, topk: int, ranking=None):
  """One block of a blocked select_chunks, for keys that do not fit in one array.

  best: (ranked f32 [b, q, k], ids int32 [b, q, k], chosen f32 [b, q, k]), the top-k so far of
  chunks < first, or None before the first block; scores: f32 [b, q, n] of chunks first ..
  first + n - 1; mask: bool broadcastable to scores; ranking: what the top-k ranks, like
  select_chunks' (default the scores). Returns the top-k of chunks < first + n, in the same form.
  After the last block, top_k_retrieval(*best) equals select_chunks(all scores, mask, k,
  all ranking): lax.top_k breaks ties toward the lower position, and the running entries (lower
  ids) come before the block's, so ties go to the lower chunk id as on the full array.
  """
  batch, queries, n = scores.shape
  if best is None:  # k empty slots: a block may hold fewer than k chunks
    best = (jnp.full((batch, queries, topk), -jnp.inf, jnp.float32),
            jnp.zeros((batch, queries, topk), jnp.int32),
            jnp.zeros((batch, queries, topk), jnp.float32))
  ranked, ids, chosen = best
  ranking = scores if ranking is None else ranking
  block_ids = jnp.broadcast_to(first + jnp.arange(n, dtype=jnp.int32), scores.shape)
  ranked, positions = jax.lax.top_k(
      jnp.concatenate([ranked, jnp.where(mask, ranking, -jnp.inf)], axis=-1), topk)
  pick = lambda running, block: jnp.take_along_axis(  # noqa: E731
      jnp.concatenate([running, block], axis=-1), positions, -1)
  return ranked, pick(ids, block_ids), pick(chosen, scores)


def inference_noise(groups, query_chunks, key_chunks):
  """The ranking of random retrieval outside training: Gumbel(0, 1) noise float32 [..., q, k]
  for query chunk ids int [..., q] of groups `groups` (int, broadcastable to [..., q]) against
  key chunk ids int [..., k].

  Each value is drawn from a key of (group, query chunk, key chunk) alone, folded into a fixed
  key, so it does not depend on the batch, the sequence length or how decoding segments the
  input: a one-shot forward and incremental decoding rank the same chunks (docs/design.md).
  """
  def one(g, j, i):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), g), j), i)
    return jax.random.gumbel(key, (), jnp.float32)

  query_chunks = jnp.asarray(query_chunks)
  groups = jnp.broadcast_to(jnp.asarray(groups), query_chunks.shape)
  groups, queries, keys = jnp.broadcast_arrays(groups[..., :, None], query_chunks[..., :, None],
                                               jnp.asarray(key_chunks)[..., None, :])
  return jax.vmap(one)(groups.reshape(-1), queries.reshape(-1),
                       keys.reshape(-1)).reshape(queries.shape)


def gumbel_noise(rng, shape):
  """Standard Gumbel(0, 1) noise, -log(Exp(1)), in float32."""
  return jax.random.gumbel(rng, shape, jnp.float32)


def shift_to_next_chunk(retrieval: Retrieval) -> Retrieval:
  """Retrieval computed at chunk j's landmark serves chunk j + 1; chunk 0 gets no valid slot."""
  def shift(x, fill):
    return jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)
  return Retrieval(shift(retrieval.indices, 0), shift(retrieval.weights, 0.0),
                   shift(retrieval.valid, False))
