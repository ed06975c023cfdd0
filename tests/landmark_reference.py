"""A dense, naive Landmark Attention for tests: the [T, T] probabilities of every query row, built
straight from the definition in docs/design.md ("Landmark Attention"), in float32 or float64."""

import jax
import jax.numpy as jnp
import numpy as np


def _rope(x, positions, theta):
  """Rotate-half RoPE of x [b, T, h, d] at integer positions [T]."""
  half = x.shape[-1] // 2
  inv_freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  angles = jnp.asarray(positions[:, None] * inv_freq[None, :], x.dtype)
  cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]
  first, second = x[..., :half], x[..., half:]
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def _top_k_mask(ranking, allowed, k):
  """bool like ranking [..., n]: the k largest allowed entries (ties to the lower index)."""
  order = jnp.argsort(-jnp.where(allowed, ranking, -jnp.inf), axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  return (rank < k) & allowed


def landmark_attention_dense(q, k, v, *, size, theta, scale, topk=None, selection="per_head"):
  """q [b, T, h, d], k, v [b, T, kv_heads, d] (T a multiple of size) -> [b, T, h, d].

  Query row i (block B_i, in-block row p_i) gets probability
    P(t) for a token row t of its own block, t <= i (one softmax over those and the landmarks);
    P(landmark of block B) * softmax_B(t) for a token row t of an earlier block B,
  where logits use RoPE with the key at p_t in the query's own block and at p_t - size in any
  earlier one. topk keeps, per row (and head, or shared across heads), the k earlier blocks with
  the largest landmark logits (shared: largest over heads of the softmax over landmarks).
  """
  batch, length, heads, _ = q.shape
  group = heads // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  rows = np.arange(length)
  position, block = rows % size, rows // size
  blocks = length // size
  q = _rope(q, position, theta)
  same = jnp.einsum("bihd,bjhd->bhij", q, _rope(k, position, theta)) * scale
  other = jnp.einsum("bihd,bjhd->bhij", q, _rope(k, position - size, theta)) * scale

  is_landmark = position == size - 1
  own = (block[:, None] == block[None, :]) & (rows[None, :] <= rows[:, None]) & ~is_landmark
  earlier = block[None, :] < block[:, None]
  # Landmark logits [b, h, T, blocks] and which earlier blocks compete.
  landmark_logits = other[..., size - 1::size]
  competing = np.broadcast_to((np.arange(blocks)[None, :] < block[:, None]), landmark_logits.shape)
  if topk is not None:
    if selection == "shared":
      probs = jax.nn.softmax(jnp.where(competing, landmark_logits, -jnp.inf), axis=-1)
      ranking = jnp.max(jnp.where(competing, probs, -jnp.inf), axis=1, keepdims=True)
      competing = jnp.broadcast_to(_top_k_mask(ranking, competing[:, :1], topk),
                                   landmark_logits.shape)
    else:
      competing = _top_k_mask(landmark_logits, competing, topk)
  landmark_key = jnp.repeat(competing, size, axis=-1) & is_landmark  # [b, h, T, T]

  top = jnp.where(own, same, jnp.where(landmark_key, other, -jnp.inf))
  top = jax.nn.softmax(top, axis=-1)
  gate = top[..., size - 1::size]  # [b, h, T, blocks]: each landmark's probability

  # Inside every block: softmax of the `other` logits over its token rows.
  token = np.broadcast_to(~is_landmark, other.shape)
  inside = jnp.where(token, other, -jnp.inf).reshape(other.shape[:-1] + (blocks, size))
  inside = jax.nn.softmax(inside, axis=-1).reshape(other.shape)
  from_memory = jnp.repeat(gate, size, axis=-1) * inside
  probs = jnp.where(own, top, jnp.where(earlier & ~is_landmark, from_memory, 0.0))
  return jnp.einsum("bhij,bjhd->bihd", probs, v)
