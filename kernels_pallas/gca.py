"""Grouped cross-attention (GCA) over retrieved chunks (REFERENCE_DRT.md §3.1).

For every query chunk and head, attend separately to each of its k retrieved memory chunks
(softmax over that chunk's keys) and mix the k results with the retrieval weights, which all
heads share: O = sum_i w_i softmax(scale * Q K_i^T) V_i.

Shapes (einsum letters): q [batch, chunks, chunk_len, heads, head_dim] ("bnshd");
k_mem, v_mem [batch, mem_chunks, mem_len, kv_heads, head_dim] ("bmtkd");
indices, weights [batch, chunks, k] ("bni"): memory chunk ids and their mixing weights.
A slot with weight 0 contributes nothing (the model's mask for chunks with fewer than k
predecessors), whatever its index points to.
"""

import functools

import jax
import jax.numpy as jnp


def check_gca_inputs(q, k_mem, v_mem, indices, weights, num_keys):
  """Raises ValueError naming the offending shape."""
  if q.ndim != 5 or k_mem.ndim != 5 or k_mem.shape != v_mem.shape:
    raise ValueError(f"q {q.shape}, k_mem {k_mem.shape}, v_mem {v_mem.shape}: expected q [batch, "
                     "chunks, chunk_len, heads, head_dim], k_mem/v_mem [batch, mem_chunks, mem_len, "
                     "kv_heads, head_dim]")
  if indices.shape != weights.shape or indices.shape[:2] != q.shape[:2] or indices.ndim != 3:
    raise ValueError(f"indices {indices.shape} and weights {weights.shape} must both be "
                     f"[batch, chunks, k] = {q.shape[:2]} + (k,)")
  if k_mem.shape[0] != q.shape[0] or k_mem.shape[4] != q.shape[4]:
    raise ValueError(f"q {q.shape} and k_mem {k_mem.shape} disagree on batch or head_dim")
  if q.shape[3] % k_mem.shape[3]:
    raise ValueError(f"heads={q.shape[3]} must be a multiple of kv_heads={k_mem.shape[3]}")
  if not 1 <= num_keys <= k_mem.shape[2]:
    raise ValueError(f"num_keys={num_keys} must be in [1, mem_len={k_mem.shape[2]}]")


@functools.partial(jax.jit, static_argnames=("scale", "num_keys", "softmax_off_by_one"))
def gca_reference(q, k_mem, v_mem, indices, weights, *, scale: float, num_keys: int | None = None,
                  softmax_off_by_one: bool = False):
  """Plain-JAX GCA with the gather: einsum and softmax in float32.

  Args:
    q: [batch, chunks, chunk_len, heads, head_dim].
    k_mem, v_mem: [batch, mem_chunks, mem_len, kv_heads, head_dim].
    indices: int [batch, chunks, k], values in [0, mem_chunks).
    weights: [batch, chunks, k] mixing weights (0 for invalid slots).
    scale: logit scale.
    num_keys: only the first num_keys rows of a memory chunk are keys (the rest, e.g. the
      landmark row, are masked); None = all mem_len rows.
    softmax_off_by_one: add 1 to every per-chunk softmax denominator, i.e. an implicit extra key
      with logit 0 and value 0, so a query can attend to "nothing" in an irrelevant chunk.
  Returns:
    [batch, chunks, chunk_len, heads, head_dim] in q's dtype.
  """
  num_keys = k_mem.shape[2] if num_keys is None else num_keys
  check_gca_inputs(q, k_mem, v_mem, indices, weights, num_keys)
  batch, chunks, chunk_len, heads, head_dim = q.shape
  kv_heads = k_mem.shape[3]
  gather = jax.vmap(lambda mem, idx: mem[idx])  # per batch row: [chunks, k, mem_len, kv_heads, d]
  k_ret = gather(k_mem[:, :, :num_keys], indices)
  v_ret = gather(v_mem[:, :, :num_keys], indices)
  q = q.reshape(batch, chunks, chunk_len, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("bnskgd,bnitkd->bnikgst", q, k_ret,
                      preferred_element_type=jnp.float32) * scale
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  if softmax_off_by_one:
    row_max = jnp.maximum(row_max, 0.0)
  unnormalized = jnp.exp(logits - jax.lax.stop_gradient(row_max))
  denominator = jnp.sum(unnormalized, axis=-1, keepdims=True)
  if softmax_off_by_one:
    denominator = denominator + jnp.exp(-jax.lax.stop_gradient(row_max))
  probs = unnormalized / denominator
  mixed = probs * weights.astype(jnp.float32)[:, :, :, None, None, None, None]
  out = jnp.einsum("bnikgst,bnitkd->bnskgd", mixed.astype(v_ret.dtype), v_ret,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, chunks, chunk_len, heads, head_dim).astype(q.dtype)
