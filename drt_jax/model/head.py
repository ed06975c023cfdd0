"""Tied LM head and the float32 cross-entropy, computed block by block over rows so the
[batch, length, vocab] float32 logits never exist at once (§2.7)."""

import functools

import jax
import jax.numpy as jnp

# The head's matmuls run on a vocabulary padded to a multiple of this (zero rows, masked out of
# the softmax): an odd vocabulary such as GPT-2's 50265 leaves the matmul operands unaligned.
VOCAB_MULTIPLE = 128


def tied_logits(hidden, embedding, dtype):
  """hidden [..., d_model] x embedding [vocab, d_model] -> float32 [..., vocab]."""
  return jnp.einsum("...d,vd->...v", hidden.astype(dtype), embedding.astype(dtype),
                    preferred_element_type=jnp.float32)


@jax.named_scope("lm_head_cross_entropy")
def cross_entropy_sum(hidden, embedding, targets, mask, *, dtype, block: int = 2048):
  """Summed token cross-entropy of the tied head.

  hidden: [batch, length, d_model]; embedding: [vocab, d_model]; targets: int [batch, length];
  mask: float/bool [batch, length] (1 = scored). Returns (sum of losses, number of scored
  tokens), both float32 scalars. Positions are processed `block` at a time, every sequence of
  the batch together (the batch axis stays whole, so a batch-sharded mesh needs no resharding).
  Under differentiation the forward also keeps d loss / d logits in the compute dtype (batch x
  length x vocab, e.g. 6.6 GB in bf16 for 4 x 16380 positions of GPT-2's vocabulary), so the
  backward pass is two matmuls and recomputes nothing.
  """
  batch, length, d_model = hidden.shape
  mask = mask.astype(jnp.float32)
  block = min(block, length)
  pad = -length % block
  if pad:  # padded positions have mask 0: they add nothing to the loss or the gradients
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
  blocks = (length + pad) // block

  def split(x):  # [batch, blocks * block, ...] -> [blocks, batch, block, ...]
    return jnp.moveaxis(x.reshape((batch, blocks, block) + x.shape[2:]), 1, 0)

  total = _blocked_nll(split(hidden), embedding, split(targets), split(mask), dtype)
  return total, jnp.sum(mask)


def _padded_table(embedding, dtype):
  """[vocab, d] -> [vocab rounded up to VOCAB_MULTIPLE, d] in the compute dtype, zero rows added."""
  return jnp.pad(embedding.astype(dtype), ((0, -embedding.shape[0] % VOCAB_MULTIPLE), (0, 0)))


def _nll_blocks(hidden, embedding, targets, mask, dtype, *, with_grad: bool):
  """hidden [blocks, batch, block, d]; targets, mask [blocks, batch, block] -> (sum of nll * mask,
  and with with_grad the compute-dtype [blocks, batch, block, padded vocab] d (that sum) / d logits)."""
  vocab = embedding.shape[0]
  table = _padded_table(embedding, dtype)

  def one_block(total, inputs):
    h, t, m = inputs
    logits = jnp.einsum("bsd,vd->bsv", h.astype(dtype), table, preferred_element_type=jnp.float32)
    column = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    logits = jnp.where(column < vocab, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    # A compare-and-select picks the target logit: no gather, and no scatter in its gradient.
    is_target = column == t[..., None]
    target = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    total = total + jnp.sum((lse - target) * m)
    if not with_grad:
      return total, None
    d_logits = (jnp.exp(logits - lse[..., None]) - is_target) * m[..., None]
    return total, d_logits.astype(dtype)

  return jax.lax.scan(one_block, jnp.zeros((), jnp.float32), (hidden, targets, mask))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_nll(hidden, embedding, targets, mask, dtype):
  return _nll_blocks(hidden, embedding, targets, mask, dtype, with_grad=False)[0]


def _blocked_nll_fwd(hidden, embedding, targets, mask, dtype):
  total, d_logits = _nll_blocks(hidden, embedding, targets, mask, dtype, with_grad=True)
  return total, (hidden, embedding, d_logits)


def _blocked_nll_bwd(dtype, residuals, g):
  """Both products take d_logits in the compute dtype with float32 accumulation (JAX's own
  transpose of a float32-output dot would multiply a float32 cotangent: float32 matmuls)."""
  hidden, embedding, d_logits = residuals
  d_hidden = jnp.einsum("nbsv,vd->nbsd", d_logits, _padded_table(embedding, dtype),
                        preferred_element_type=jnp.float32)
  d_table = jnp.einsum("nbsv,nbsd->vd", d_logits, hidden.astype(dtype),
                       preferred_element_type=jnp.float32)
  d_hidden = (g * d_hidden).astype(hidden.dtype)
  d_embedding = (g * d_table[:embedding.shape[0]]).astype(embedding.dtype)
  return d_hidden, d_embedding, None, None


_blocked_nll.defvjp(_blocked_nll_fwd, _blocked_nll_bwd)
