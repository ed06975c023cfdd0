"""Causal sliding-window attention with ALiBi (REFERENCE_DRT.md §2.3).

Query position i attends key positions j with i - window <= j <= i, logits scaled by `scale` and
biased by -slope_h * (i - j) when ALiBi slopes are given.
Shapes: q [batch, length, heads, head_dim], k/v [batch, length, kv_heads, head_dim]; heads is a
multiple of kv_heads (grouped-query attention: query head n uses kv head n // (heads // kv_heads)).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi slopes 2^(-8 (h + 1) / H), the reference's formula for every head count (§8 item 10)."""
  return 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)


def _check_shapes(q, k, v, window):
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q [batch, length, heads, "
                     "head_dim] and k, v [batch, length, kv_heads, head_dim]")
  if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, length or head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"heads={q.shape[2]} must be a multiple of kv_heads={k.shape[2]}")
  if window < 0:
    raise ValueError(f"window={window} must be >= 0")


@functools.partial(jax.jit, static_argnames=("window", "scale", "block"))
def sliding_window_reference(q, k, v, slopes=None, *, window: int, scale: float, block: int = 64):
  """Plain-JAX sliding-window attention in O(length * window) memory and time.

  Queries are taken `block` at a time; each query block sees the `window` keys before it plus its
  own block, gathered as shifted views of the padded keys, so no [length, length] array exists.

  Args:
    q: [batch, length, heads, head_dim].
    k, v: [batch, length, kv_heads, head_dim].
    slopes: optional [heads] ALiBi slopes (float32); None disables ALiBi.
    window: keys at distance <= window are visible.
    scale: logit scale (usually head_dim ** -0.5).
    block: query block size of the blocking (a performance knob; the result does not depend on it).
  Returns:
    [batch, length, heads, head_dim] in q's dtype; softmax and accumulation in float32.
  """
  _check_shapes(q, k, v, window)
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  block = min(block, length)
  num_blocks = -(-length // block)
  padded_len = num_blocks * block
  lookback = -(-window // block)  # key blocks before the query block
  pad_back = padded_len - length

  def pad(x, front):
    return jnp.pad(x, ((0, 0), (front, pad_back), (0, 0), (0, 0)))

  q_blocks = pad(q, 0).reshape(batch, num_blocks, block, kv_heads, group, head_dim)
  k_pad, v_pad = pad(k, lookback * block), pad(v, lookback * block)

  def key_span(x):  # [batch, num_blocks, (lookback + 1) * block, kv_heads, head_dim]
    x = x.reshape(batch, num_blocks + lookback, block, kv_heads, head_dim)
    views = [x[:, i:i + num_blocks] for i in range(lookback + 1)]
    return jnp.concatenate(views, axis=2)

  k_span, v_span = key_span(k_pad), key_span(v_pad)
  logits = jnp.einsum("bnqkgd,bnskd->bnkgqs", q_blocks, k_span,
                      preferred_element_type=jnp.float32) * scale
  q_pos = (jnp.arange(num_blocks)[:, None] * block + jnp.arange(block)[None, :])
  k_pos = (jnp.arange(num_blocks)[:, None] * block - lookback * block
           + jnp.arange((lookback + 1) * block)[None, :])
  distance = q_pos[:, :, None] - k_pos[:, None, :]  # [num_blocks, block, span]
  visible = (distance >= 0) & (distance <= window) & (k_pos[:, None, :] >= 0)
  if slopes is not None:
    slopes = jnp.asarray(slopes, jnp.float32).reshape(kv_heads, group)
    logits = logits - slopes[:, :, None, None] * distance.astype(jnp.float32)[:, None, None]
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bnkgqs,bnskd->bnqkgd", probs.astype(v.dtype), v_span,
                   preferred_element_type=jnp.float32)
  out = out.reshape(batch, padded_len, heads, head_dim)[:, :length]
  return out.astype(q.dtype)
