"""Landmark Attention's grouped softmax (Mohtashami & Jaggi, 2023, §3), blockwise in plain JAX.

The sequence is cut into blocks of S = chunk_len + 1 rows: chunk_len tokens and the block's
landmark. A query row of block j attends
  * the token rows of its own block up to itself, directly (its own block's landmark is never a
    key, even for the landmark's own query);
  * every earlier block i < j through that block's landmark: the landmark's logit competes with
    the own-block tokens in one softmax, and its probability is shared among the block's
    chunk_len tokens by a softmax of their logits inside the block. Landmark values are never
    read.
Training lets every earlier block compete; inference keeps only the top-k earlier blocks by
landmark logit (`select_blocks`), which is the same computation with the other landmarks left out:
with k >= the number of earlier blocks the two are equal.

Shapes: b batch, r query rows, S rows per block, m memory blocks, h query heads, g = h / kv heads
query heads per K/V head, d head_dim. All logits and softmaxes are float32.

Positions (RoPE) restart in every block: a query at in-block row p is rotated by p, its own
block's keys by their row p', and every earlier block's keys by p' - S, as if that block sat right
before the query's block (`rotate`; why: docs/design.md, "Landmark Attention").
"""

import jax
import jax.numpy as jnp

from drt_jax.model import layers

_PIECES = 4  # runs of query blocks in a whole-sequence forward (landmark_attention)


def select_blocks(landmark_logits, visible, topk: int, selection: str):
  """Which earlier blocks each query row keeps at inference: its top-k by landmark logit.

  landmark_logits: f32 [b, h, r, m]; visible: bool broadcastable to it (block i is earlier than
  the query's block). selection "per_head": each head ranks by its own logits (the original's
  per-token, per-head retrieval); "shared": one set per query row for all heads, ranked by the
  largest over heads of the softmax over visible landmarks (the original's "max over heads").
  Returns bool [b, h, r, m]: visible and among the top-k. Ties go to the earlier block.
  """
  logits = jax.lax.stop_gradient(jnp.where(visible, landmark_logits, -jnp.inf))
  if selection == "shared":
    probs = jnp.where(visible, jax.nn.softmax(logits, axis=-1, where=visible), -jnp.inf)
    ranking = jnp.max(probs, axis=1, keepdims=True)  # [b, 1, r, m]
  else:
    ranking = logits
  k = min(topk, ranking.shape[-1])
  ranked, chosen = jax.lax.top_k(ranking, k)
  hit = (chosen[..., :, None] == jnp.arange(ranking.shape[-1])) & (ranked > -jnp.inf)[..., None]
  return jnp.broadcast_to(jnp.any(hit, axis=-2), landmark_logits.shape) & visible


def grouped_attention(q, k_own, v_own, own_visible, k_mem, v_mem, mem_visible, *, scale: float,
                      topk: int | None = None, selection: str = "per_head"):
  """Grouped-softmax attention of query rows over their own block and earlier blocks.

  q: [b, r, h, d]; k_own, v_own: [b, S, kv_heads, d], the query rows' own block (only the rows
  own_visible [b or 1, r, S] marks are keys: causal, never the landmark row); k_mem, v_mem:
  [b, m, S, kv_heads, d], earlier blocks (row S - 1 is the landmark); mem_visible: bool
  [b or 1, r, m], the blocks each row may attend (earlier than its own). topk: None lets every
  visible block compete (training); an int keeps the top-k per select_blocks. Returns f32
  [b, r, h, d].
  """
  batch, rows, heads, head_dim = q.shape
  kv_heads = k_own.shape[2]
  group = heads // kv_heads
  qg = q.reshape(batch, rows, kv_heads, group, head_dim)
  f32 = jnp.float32
  own = jnp.einsum("brkgd,bskd->bkgrs", qg, k_own, preferred_element_type=f32) * scale
  mem = jnp.einsum("brkgd,bmskd->bkgrms", qg, k_mem, preferred_element_type=f32) * scale
  mem = mem.reshape(batch, heads, rows, mem.shape[-2], mem.shape[-1])
  own = own.reshape(batch, heads, rows, -1)
  visible = mem_visible[:, None]  # [b, 1, r, m]
  landmark = mem[..., -1]
  if topk is not None:
    visible = select_blocks(landmark, visible, topk, selection)
  own_visible = own_visible[:, None]  # [b, 1, r, S]
  # One softmax over the own block's visible tokens and the visible earlier landmarks.
  top = jnp.concatenate([jnp.where(visible, landmark, -jnp.inf),
                         jnp.where(own_visible, own, -jnp.inf)], axis=-1)
  top = jax.nn.softmax(top, axis=-1)
  p_landmark, p_own = top[..., :landmark.shape[-1]], top[..., landmark.shape[-1]:]
  # Each landmark's probability is shared among its block's tokens (landmark row excluded).
  inside = jax.nn.softmax(mem[..., :-1], axis=-1) * p_landmark[..., None]  # [b, h, r, m, S - 1]
  dtype = v_own.dtype

  def by_kv_head(p):  # [b, h, ...] -> [b, kv_heads, group, ...]
    return p.reshape((batch, kv_heads, group) + p.shape[2:]).astype(dtype)

  out = jnp.einsum("bkgrs,bskd->brkgd", by_kv_head(p_own), v_own, preferred_element_type=f32)
  out = out + jnp.einsum("bkgrms,bmskd->brkgd", by_kv_head(inside), v_mem[:, :, :-1],
                         preferred_element_type=f32)
  return out.reshape(batch, rows, heads, head_dim)


def own_block_mask(query_rows, size: int):
  """Own-block keys of query rows at in-block positions query_rows (int [..., r]) -> bool
  [..., r, S]: causal, and never the block's landmark (row S - 1)."""
  keys = jnp.arange(size)
  return (keys <= query_rows[..., None]) & (keys < size - 1)


def attend_blocks(q, k, v, k_mem, v_mem, first, *, scale: float, topk: int | None = None,
                  selection: str = "per_head"):
  """Whole query blocks, one block at a time (lax.map under remat: per step the logits are
  [b, h, S, m, S], never [T, T]).

  q: [b, n, S, h, d]; k, v: [b, n, S, kv_heads, d], the query blocks' own rows; k_mem, v_mem:
  [b, m, S, kv_heads, d], the memory of earlier blocks, where query block j sits at memory index
  first + j (int scalar or [b]) and sees memory blocks < first + j. Returns f32 [b, n, S, h, d].
  """
  batch, blocks, size = q.shape[:3]
  memory = k_mem.shape[1]
  own_visible = own_block_mask(jnp.arange(size), size)[None]

  @jax.checkpoint
  def one_block(inputs):
    q_j, k_j, v_j, j = inputs
    block = jnp.broadcast_to(jnp.asarray(first) + j, (batch,))
    mem_visible = jnp.arange(memory)[None, None, :] < block[:, None, None]  # [b, 1, m]
    return grouped_attention(q_j, k_j, v_j, own_visible, k_mem, v_mem, mem_visible, scale=scale,
                             topk=topk, selection=selection)

  per_block = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
  out = jax.lax.map(one_block, (per_block(q), per_block(k), per_block(v), jnp.arange(blocks)))
  return jnp.moveaxis(out, 0, 1)


def rotate(x, theta: float, *, earlier: bool = False):
  """Rows of whole blocks [..., S, heads, d]: RoPE at in-block positions 0 .. S - 1, or -S .. -1
  for a block seen as an earlier block's keys."""
  size = x.shape[-3]
  return layers.apply_rope(x, theta, jnp.arange(size) - (size if earlier else 0))


def landmark_attention(q, k, v, *, chunk_size: int, theta: float, scale: float,
                       topk: int | None = None, selection: str = "per_head"):
  """Causal landmark attention over a whole sequence of blocks, from its start.

  q: [b, n * S, h, d]; k, v: [b, n * S, kv_heads, d], not yet rotated (S = chunk_size, the last
  row of every block its landmark). topk, selection: as grouped_attention's. Returns f32
  [b, n * S, h, d].
  """
  batch, rows = q.shape[:2]
  blocks = rows // chunk_size
  in_blocks = lambda t: t.reshape((batch, blocks, chunk_size) + t.shape[2:])  # noqa: E731
  q, k, v = rotate(in_blocks(q), theta), in_blocks(k), in_blocks(v)
  k_own, k_mem = rotate(k, theta), rotate(k, theta, earlier=True)
  # Query blocks in _PIECES runs, each over the memory blocks before its end only: most of the
  # causal upper triangle is never scored (4 runs: 10/16 of the logits of one run over all).
  ends = sorted({-(-blocks * (p + 1) // _PIECES) for p in range(_PIECES)})
  out = [attend_blocks(q[:, start:end], k_own[:, start:end], v[:, start:end], k_mem[:, :end],
                       v[:, :end], start, scale=scale, topk=topk, selection=selection)
         for start, end in zip([0] + ends[:-1], ends)]
  out = jnp.concatenate(out, axis=1)
  return out.reshape((batch, rows) + out.shape[3:])
