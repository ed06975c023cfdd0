"""Tied LM head and the float32 cross-entropy, computed block by block over positions so the
[batch, length, vocab] logits never exist at once (§2.7)."""

import jax
import jax.numpy as jnp


def tied_logits(hidden, embedding, dtype):
  """hidden [..., d_model] x embedding [vocab, d_model] -> float32 [..., vocab]."""
  return jnp.einsum("...d,vd->...v", hidden.astype(dtype), embedding.astype(dtype),
                    preferred_element_type=jnp.float32)


def cross_entropy_sum(hidden, embedding, targets, mask, *, dtype, block: int = 512):
  """Summed token cross-entropy of the tied head.

  hidden: [batch, length, d_model]; embedding: [vocab, d_model]; targets: int [batch, length];
  mask: float/bool [batch, length] (1 = scored). Returns (sum of losses, number of scored
  tokens), both float32 scalars. Positions are processed `block` at a time under remat.
  """
  batch, length, d_model = hidden.shape
  block = min(block, length)
  pad = -length % block
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
  num_blocks = (length + pad) // block

  def split(x):
    return jnp.moveaxis(x.reshape((batch, num_blocks, block) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def block_loss(carry, inputs):
    h, t, m = inputs
    logits = tied_logits(h, embedding, dtype)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]
    return carry + jnp.sum(nll * m), None

  mask = mask.astype(jnp.float32)
  total, _ = jax.lax.scan(block_loss, jnp.zeros((), jnp.float32),
                          (split(hidden), split(targets), split(mask)))
  return total, jnp.sum(mask)
