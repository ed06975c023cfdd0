"""Tied LM head and the float32 cross-entropy, computed block by block over rows so the
[batch, length, vocab] logits never exist at once (§2.7)."""

import functools

import jax
import jax.numpy as jnp


def tied_logits(hidden, embedding, dtype):
  """hidden [..., d_model] x embedding [vocab, d_model] -> float32 [..., vocab]."""
  return jnp.einsum("...d,vd->...v", hidden.astype(dtype), embedding.astype(dtype),
                    preferred_element_type=jnp.float32)


@jax.named_scope("lm_head_cross_entropy")
def cross_entropy_sum(hidden, embedding, targets, mask, *, dtype, block: int = 8192):
  """Summed token cross-entropy of the tied head.

  hidden: [batch, length, d_model]; embedding: [vocab, d_model]; targets: int [batch, length];
  mask: float/bool [batch, length] (1 = scored). Returns (sum of losses, number of scored
  tokens), both float32 scalars. The batch x length rows are processed `block` at a time; the
  backward pass recomputes each block's logits (no [rows, vocab] array is kept).
  """
  d_model = hidden.shape[-1]
  hidden, targets = hidden.reshape(-1, d_model), targets.reshape(-1)
  mask = mask.reshape(-1).astype(jnp.float32)
  block = min(block, hidden.shape[0])
  pad = -hidden.shape[0] % block
  if pad:  # padded rows have mask 0: they add nothing to the loss or the gradients
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets, mask = jnp.pad(targets, (0, pad)), jnp.pad(mask, (0, pad))
  blocks = hidden.shape[0] // block
  total = _blocked_nll(hidden.reshape(blocks, block, d_model), embedding,
                       targets.reshape(blocks, block), mask.reshape(blocks, block), dtype)
  return total, jnp.sum(mask)


def _block_logits(h, embedding, dtype):
  return jax.lax.dot_general(h.astype(dtype), embedding.astype(dtype), (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _is_target(logits, t):
  return jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t[:, None]


def _nll_forward(hidden, embedding, targets, mask, dtype):
  """hidden [blocks, block, d]; targets, mask [blocks, block] -> (sum of nll * mask, lse)."""
  def one_block(total, inputs):
    h, t, m = inputs
    logits = _block_logits(h, embedding, dtype)
    lse = jax.nn.logsumexp(logits, axis=-1)
    # A compare-and-select picks the target logit: no gather, and its transpose is no scatter.
    target = jnp.sum(jnp.where(_is_target(logits, t), logits, 0.0), axis=-1)
    return total + jnp.sum((lse - target) * m), lse
  return jax.lax.scan(one_block, jnp.zeros((), jnp.float32), (hidden, targets, mask))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_nll(hidden, embedding, targets, mask, dtype):
  return _nll_forward(hidden, embedding, targets, mask, dtype)[0]


def _blocked_nll_fwd(hidden, embedding, targets, mask, dtype):
  total, lse = _nll_forward(hidden, embedding, targets, mask, dtype)
  return total, (hidden, embedding, targets, mask, lse)


def _blocked_nll_bwd(dtype, residuals, g):
  """d nll / d logits = softmax - onehot, rounded to the compute dtype for both matmuls (the
  products of a dot with a float32 cotangent would run as float32 matmuls)."""
  hidden, embedding, targets, mask, lse = residuals
  embedding_c = embedding.astype(dtype)

  def one_block(d_embedding, inputs):
    h, t, m, row_lse = inputs
    logits = _block_logits(h, embedding, dtype)
    probs = jnp.exp(logits - row_lse[:, None])
    d_logits = ((probs - _is_target(logits, t)) * (g * m)[:, None]).astype(dtype)
    d_h = jnp.dot(d_logits, embedding_c, preferred_element_type=jnp.float32)
    d_embedding = d_embedding + jax.lax.dot_general(
        d_logits, h.astype(dtype), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return d_embedding, d_h.astype(hidden.dtype)

  d_embedding, d_hidden = jax.lax.scan(one_block, jnp.zeros(embedding.shape, jnp.float32),
                                       (hidden, targets, mask, lse))
  return d_hidden, d_embedding.astype(embedding.dtype), None, None


_blocked_nll.defvjp(_blocked_nll_fwd, _blocked_nll_bwd)
