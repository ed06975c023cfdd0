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
landmark logit (`top_blocks`), which is the same computation with the other landmarks left out:
with k >= the number of earlier blocks the two are equal.

Two forms of one computation: `grouped_attention` (query rows against their own block and a memory
of earlier blocks: decoding's steps and segments, via `attend_blocks`) and `landmark_attention`
(a whole sequence from its start: the training forward and the one-shot inference forward), a
flash-style scan over tiles with a hand-written backward (`grouped_softmax`; docs/design.md,
"Landmark Attention", says why).

Shapes: b batch, r query rows, S rows per block, m memory blocks, h query heads, g = h / kv heads
query heads per K/V head, d head_dim. All logits and softmaxes are float32.

Positions (RoPE) restart in every block: a query at in-block row p is rotated by p, its own
block's keys by their row p', and every earlier block's keys by p' - S, as if that block sat right
before the query's block (`rotate`; why: docs/design.md, "Landmark Attention").
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.model import layers


def top_blocks(landmark_logits, visible, topk: int, selection: str):
  """The earlier blocks each query row keeps at inference: its top-k by landmark logit.

  landmark_logits: f32 [b, h, r, m]; visible: bool broadcastable to it (block i is earlier than
  the query's block). selection "per_head": each head ranks by its own logits (the original's
  per-token, per-head retrieval); "shared": one set per query row for all heads, ranked by the
  largest over heads of the softmax over visible landmarks (the original's "max over heads").
  Returns int32 [b, h (1 if shared), r, min(topk, m)]: block indices, -1 where fewer than topk
  blocks are visible. Ties go to the earlier block.
  """
  logits = jax.lax.stop_gradient(jnp.where(visible, landmark_logits, -jnp.inf))
  if selection == "shared":
    probs = jnp.where(visible, jax.nn.softmax(logits, axis=-1, where=visible), -jnp.inf)
    ranking = jnp.max(probs, axis=1, keepdims=True)  # [b, 1, r, m]
  else:
    ranking = logits
  ranked, chosen = jax.lax.top_k(ranking, min(topk, ranking.shape[-1]))
  return jnp.where(ranked > -jnp.inf, chosen, -1)


def select_blocks(landmark_logits, visible, topk: int, selection: str):
  """top_blocks as a mask: bool [b, h, r, m], visible and among the top-k."""
  chosen = top_blocks(landmark_logits, visible, topk, selection)
  hit = chosen[..., :, None] == jnp.arange(landmark_logits.shape[-1])
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
  """Whole query blocks over a memory of earlier blocks, one block at a time (lax.map under remat:
  per step the logits are [b, h, S, m, S], never [T, T]). Decoding's segments use it; a whole
  sequence from its start goes through landmark_attention's tiled scan instead.

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


# The whole-sequence forward (landmark_attention), flash-style: one fixed-size scan body over
# tiles of _TILE_ROWS query rows x _TILE_ROWS key rows, lower triangle only. Layout inside: q
# [b, k, g, T, d] and k, v [b, k, T, d] (k = kv heads, g = query heads per kv head), so every
# tile's matmuls are plain batched [rows, d] x [d, rows] products with no transposes.
_TILE_ROWS = 1024


def tile_blocks_for(blocks: int, size: int) -> int:
  """Blocks per tile: about _TILE_ROWS rows, equal tiles covering `blocks` with the least
  padding."""
  tiles = -(-blocks // max(1, _TILE_ROWS // size))
  return -(-blocks // tiles)


def _tile_pairs(tiles: int):
  """Static (query tile, key tile) pairs of the causal lower triangle, diagonal included."""
  pairs = np.array([(i, j) for i in range(tiles) for j in range(i + 1)], np.int32)
  return pairs[:, 0], pairs[:, 1]


def _by_block(x, size: int):
  """[b, k, g, T, ...] -> [b, k, n, g, S, ...]: blocks next to the batch axes, so the own-block
  matmuls have leading batch dimensions (the CPU backend runs no bf16 x bf16 -> f32 dot
  otherwise)."""
  shape = x.shape[:3] + (x.shape[3] // size, size) + x.shape[4:]
  return jnp.moveaxis(x.reshape(shape), 3, 2)


def _by_row(x):
  """_by_block's inverse."""
  x = jnp.moveaxis(x, 2, 3)
  return x.reshape(x.shape[:3] + (x.shape[3] * x.shape[4],) + x.shape[5:])


def _own_logits(q, k, size: int, scale: float):
  """Every block's rows over its own block: f32 [b, k, n, g, S, S], -inf outside
  own_block_mask. q: [b, k, g, T, d]; k: [b, k, T, d]."""
  kb = k.reshape(k.shape[:2] + (k.shape[2] // size, size, k.shape[3]))
  logits = jnp.einsum("bkngqd,bknsd->bkngqs", _by_block(q, size), kb,
                      preferred_element_type=jnp.float32) * scale
  return jnp.where(own_block_mask(jnp.arange(size), size), logits, -jnp.inf)


def _memory_tile(q, k, chosen, qt, kt, *, size: int, scale: float, tile_blocks: int):
  """Query tile qt over the earlier blocks of key tile kt.

  Returns logits f32 [b, k, g, R, C, S] (R = C * S rows, C = tile_blocks), the landmark logits
  of the visible blocks (-inf elsewhere) [b, k, g, R, C], each block's log-sum-exp over its token
  rows [b, k, g, R, C], and the tile's q [b, k, g, R, d] and k [b, k, R, d].
  """
  rows = tile_blocks * size
  q_t = jax.lax.dynamic_slice_in_dim(q, qt * rows, rows, axis=3)
  k_t = jax.lax.dynamic_slice_in_dim(k, kt * rows, rows, axis=2)
  logits = jnp.einsum("bkgqd,bksd->bkgqs", q_t, k_t, preferred_element_type=jnp.float32) * scale
  logits = logits.reshape(logits.shape[:-1] + (tile_blocks, size))
  query_block = qt * tile_blocks + jnp.arange(rows) // size
  key_block = kt * tile_blocks + jnp.arange(tile_blocks)
  visible = key_block[None, :] < query_block[:, None]  # [R, C]
  if chosen is not None:  # inference: only the query's top-k blocks
    c_t = jax.lax.dynamic_slice_in_dim(chosen, qt * rows, rows, axis=3)
    visible = visible & jnp.any(c_t[..., None] == key_block, axis=-2)
  landmark = jnp.where(visible, logits[..., -1], -jnp.inf)
  is_token = jnp.arange(size) < size - 1
  peak = jnp.max(jnp.where(is_token, logits, -jnp.inf), axis=-1)
  total = jnp.sum(jnp.where(is_token, jnp.exp(logits - peak[..., None]), 0.0), axis=-1)
  return logits, landmark, peak + jnp.log(total), q_t, k_t


def _rows(x, tile, tile_rows: int, axis: int):
  """Rows tile * tile_rows ... of x along axis (the row axis: 3 of q-shaped, 2 of k-shaped)."""
  return jax.lax.dynamic_slice_in_dim(x, tile * tile_rows, tile_rows, axis=axis)


def _put_rows(x, y, tile, axis: int):
  """x with _rows(x, tile, ...) replaced by y."""
  return jax.lax.dynamic_update_slice_in_dim(x, y, tile * y.shape[axis], axis=axis)


def _grouped_forward(q, k_own, k_mem, v, chosen, size, scale, tile_blocks):
  """(out f32 [b, k, g, T, d], log of the grouped softmax's normaliser f32 [b, k, g, T])."""
  f32 = jnp.float32
  blocks = q.shape[3] // size
  # Own block: one exact softmax term per row (every row sees at least its block's row 0).
  own = _own_logits(q, k_own, size, scale)
  own_max = jnp.max(own, axis=-1)
  own_exp = jnp.exp(own - own_max[..., None])
  own_sum = _by_row(jnp.sum(own_exp, axis=-1))
  own_acc = _by_row(jnp.einsum("bkngqs,bknsd->bkngqd", own_exp.astype(v.dtype),
                               v.reshape(v.shape[:2] + (blocks, size, v.shape[3])),
                               preferred_element_type=f32))
  own_max = _by_row(own_max)
  # Earlier blocks: an online softmax over their landmarks, tile by tile; block i contributes
  # exp(landmark_i) times its within-block softmax average of values.
  is_token = jnp.arange(size) < size - 1
  tile_rows = tile_blocks * size

  def tile(carry, pair):
    run_max, run_sum, run_acc = carry
    qt, kt = pair
    logits, landmark, lse, _, _ = _memory_tile(q, k_mem, chosen, qt, kt, size=size, scale=scale,
                                               tile_blocks=tile_blocks)
    v_t = _rows(v, kt, tile_rows, 2)
    old_max, old_sum, old_acc = (_rows(x, qt, tile_rows, 3) for x in (run_max, run_sum, run_acc))
    new_max = jnp.maximum(old_max, jnp.max(landmark, axis=-1))
    shift = jnp.where(new_max > -jnp.inf, new_max, 0.0)
    keep = jnp.exp(old_max - shift)
    probs = jnp.where(is_token, jnp.exp(logits - (lse - landmark + shift[..., None])[..., None]),
                      0.0)
    acc = jnp.einsum("bkgqs,bksd->bkgqd", probs.reshape(probs.shape[:4] + (tile_rows,)
                                                          ).astype(v.dtype),
                     v_t, preferred_element_type=f32)
    new_sum = old_sum * keep + jnp.sum(jnp.exp(landmark - shift[..., None]), axis=-1)
    new_acc = old_acc * keep[..., None] + acc
    return (_put_rows(run_max, new_max, qt, 3), _put_rows(run_sum, new_sum, qt, 3),
            _put_rows(run_acc, new_acc, qt, 3)), None

  init = (jnp.full(own_max.shape, -jnp.inf, f32), jnp.zeros(own_max.shape, f32),
          jnp.zeros(q.shape, f32))
  (mem_max, mem_sum, mem_acc), _ = jax.lax.scan(tile, init, _tile_pairs(blocks // tile_blocks))
  top = jnp.maximum(own_max, mem_max)
  own_w, mem_w = jnp.exp(own_max - top), jnp.exp(mem_max - top)
  total = own_w * own_sum + mem_w * mem_sum
  out = (own_w[..., None] * own_acc + mem_w[..., None] * mem_acc) / total[..., None]
  return out, top + jnp.log(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def grouped_softmax(q, k_own, k_mem, v, chosen, size: int, scale: float, tile_blocks: int):
  """The grouped softmax of whole blocks from the sequence start, flash-style (module docstring).

  q: [b, k, g, T, d] rotated at in-block positions; k_own / k_mem: [b, k, T, d] rotated as own /
  earlier blocks; v: [b, k, T, d]; chosen: None (every earlier block competes) or int32 [b, k or
  1, g or 1, T, topk], the blocks each row keeps (-1: none). T a multiple of tile_blocks * size.
  Returns f32 [b, k, g, T, d]. The backward recomputes every tile's logits from q and k and the
  saved per-row normaliser, as flash attention does: nothing [T, T]-sized is kept.
  """
  return _grouped_forward(q, k_own, k_mem, v, chosen, size, scale, tile_blocks)[0]


def _grouped_fwd(q, k_own, k_mem, v, chosen, size, scale, tile_blocks):
  out, log_norm = _grouped_forward(q, k_own, k_mem, v, chosen, size, scale, tile_blocks)
  return out, (q, k_own, k_mem, v, chosen, out, log_norm)


def _grouped_bwd(size, scale, tile_blocks, residuals, d_out):
  """With P the probability of every key (own tokens; an earlier block's token t: landmark
  probability g_i times the within-block softmax s_it) and dP = dO . v: own logits get
  P (dP - delta), delta = dO . O; token t of earlier block i gets P (dP - c_i) with
  c_i = sum_t s_it dP_it; landmark i gets g_i (c_i - delta)."""
  q, k_own, k_mem, v, chosen, out, log_norm = residuals
  f32 = jnp.float32
  blocks = q.shape[3] // size
  delta = jnp.sum(d_out * out, axis=-1)  # [b, k, g, T]
  do = d_out.astype(v.dtype)
  # Own block.
  kv_blocks = lambda x: x.reshape(x.shape[:2] + (blocks, size, x.shape[3]))  # noqa: E731
  probs = jnp.exp(_own_logits(q, k_own, size, scale) - _by_block(log_norm, size)[..., None])
  do_b = _by_block(do, size)
  d_probs = jnp.einsum("bkngqd,bknsd->bkngqs", do_b, kv_blocks(v), preferred_element_type=f32)
  d_logits = (probs * (d_probs - _by_block(delta, size)[..., None])).astype(q.dtype)
  dq = _by_row(jnp.einsum("bkngqs,bknsd->bkngqd", d_logits, kv_blocks(k_own),
                          preferred_element_type=f32)) * scale
  dk_own = jnp.einsum("bkngqs,bkngqd->bknsd", d_logits, _by_block(q, size),
                      preferred_element_type=f32).reshape(k_own.shape) * scale
  dv = jnp.einsum("bkngqs,bkngqd->bknsd", probs.astype(v.dtype), do_b,
                  preferred_element_type=f32).reshape(v.shape)
  # Earlier blocks, tile by tile.
  is_token = jnp.arange(size) < size - 1
  tile_rows = tile_blocks * size

  def tile(carry, pair):
    dq, dk, dv = carry
    qt, kt = pair
    logits, landmark, lse, q_t, k_t = _memory_tile(q, k_mem, chosen, qt, kt, size=size,
                                                   scale=scale, tile_blocks=tile_blocks)
    do_t, v_t = _rows(do, qt, tile_rows, 3), _rows(v, kt, tile_rows, 2)
    within = jnp.where(is_token, jnp.exp(logits - lse[..., None]), 0.0)  # s_it
    # g_i, 0 where block i is not visible
    gate = jnp.exp(landmark - _rows(log_norm, qt, tile_rows, 3)[..., None])
    d_probs = jnp.einsum("bkgqd,bksd->bkgqs", do_t, v_t, preferred_element_type=f32)
    d_probs = d_probs.reshape(logits.shape)
    c = jnp.sum(within * d_probs, axis=-1)
    p = within * gate[..., None]
    d_logits = jnp.where(is_token, p * (d_probs - c[..., None]),
                         (gate * (c - _rows(delta, qt, tile_rows, 3)[..., None]))[..., None])
    flat = lambda x: x.reshape(x.shape[:4] + (tile_rows,))  # noqa: E731
    d_logits = flat(d_logits).astype(q.dtype)
    dq_t = jnp.einsum("bkgqs,bksd->bkgqd", d_logits, k_t, preferred_element_type=f32) * scale
    dk_t = jnp.einsum("bkgqs,bkgqd->bksd", d_logits, q_t, preferred_element_type=f32) * scale
    dv_t = jnp.einsum("bkgqs,bkgqd->bksd", flat(p).astype(v.dtype), do_t,
                      preferred_element_type=f32)
    def add(x, y, tile, axis):
      return _put_rows(x, _rows(x, tile, tile_rows, axis) + y, tile, axis)
    return (add(dq, dq_t, qt, 3), add(dk, dk_t, kt, 2), add(dv, dv_t, kt, 2)), None

  (dq, dk_mem, dv), _ = jax.lax.scan(tile, (dq, jnp.zeros(k_mem.shape, f32), dv),
                                     _tile_pairs(blocks // tile_blocks))
  return (dq.astype(q.dtype), dk_own.astype(k_own.dtype), dk_mem.astype(k_mem.dtype),
          dv.astype(v.dtype), None)


grouped_softmax.defvjp(_grouped_fwd, _grouped_bwd)


def _chosen_blocks(q, k_mem, *, size: int, scale: float, topk: int, selection: str,
                   tile_blocks: int):
  """Each row's top-k earlier blocks (select_blocks' rule), int32 [b, k or 1, g or 1, T, topk]
  (-1: none), from its logits over every landmark key, one query tile at a time."""
  batch, kv_heads, group, rows, head_dim = q.shape
  landmarks = k_mem[:, :, size - 1::size]  # [b, k, n, d]
  tile_rows = tile_blocks * size

  def one_tile(qt):
    q_t = jax.lax.dynamic_slice_in_dim(q, qt * tile_rows, tile_rows, axis=3)
    logits = jnp.einsum("bkgqd,bknd->bkgqn", q_t, landmarks,
                        preferred_element_type=jnp.float32) * scale
    query_block = qt * tile_blocks + jnp.arange(tile_rows) // size
    visible = jnp.arange(landmarks.shape[2])[None, :] < query_block[:, None]
    heads = logits.reshape(batch, kv_heads * group, tile_rows, -1)
    chosen = top_blocks(heads, visible[None, None], topk, selection)
    return chosen.reshape(batch, -1, group if chosen.shape[1] > 1 else 1, tile_rows,
                          chosen.shape[-1])

  chosen = jax.lax.map(one_tile, jnp.arange(rows // tile_rows))  # [tiles, b, k, g, R, topk]
  return jnp.moveaxis(chosen, 0, 3).reshape(chosen.shape[1:4] + (rows, chosen.shape[-1]))


def landmark_attention(q, k, v, *, chunk_size: int, theta: float, scale: float,
                       topk: int | None = None, selection: str = "per_head",
                       tile_blocks: int | None = None):
  """Causal landmark attention over a whole sequence of blocks, from its start.

  q: [b, n * S, h, d]; k, v: [b, n * S, kv_heads, d], not yet rotated (S = chunk_size, the last
  row of every block its landmark). topk, selection: as grouped_attention's. tile_blocks: blocks
  per tile of grouped_softmax (default tile_blocks_for). Returns f32 [b, n * S, h, d].
  """
  batch, rows, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  size = chunk_size
  blocks = rows // size
  tile_blocks = min(tile_blocks or tile_blocks_for(blocks, size), blocks)
  padded = -(-blocks // tile_blocks) * tile_blocks
  in_blocks = lambda t: t.reshape((batch, blocks, size) + t.shape[2:])  # noqa: E731
  q, k, v = rotate(in_blocks(q), theta), in_blocks(k), in_blocks(v)
  k_own, k_mem = rotate(k, theta), rotate(k, theta, earlier=True)

  def layout(x):  # [b, n, S, heads, d] -> [b, kv_heads, heads / kv_heads, padded * S, d]
    x = jnp.pad(x, ((0, 0), (0, padded - blocks)) + ((0, 0),) * 3)
    x = x.reshape(batch, padded * size, kv_heads, -1, head_dim)
    return jnp.transpose(x, (0, 2, 3, 1, 4))

  q, k_own, k_mem, v = layout(q), layout(k_own)[:, :, 0], layout(k_mem)[:, :, 0], layout(v)[:, :, 0]
  chosen = None
  if topk is not None:
    chosen = _chosen_blocks(q, k_mem, size=size, scale=scale, topk=topk, selection=selection,
                            tile_blocks=tile_blocks)
  out = grouped_softmax(q, k_own, k_mem, v, chosen, size, scale, tile_blocks)
  out = jnp.transpose(out, (0, 3, 1, 2, 4))[:, :rows]  # [b, T, k, g, d]
  return out.reshape(batch, rows, heads, head_dim)
