"""The blocked cross-entropy of the tied head against a float64 dense reference (§2.7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax.model.head import cross_entropy_sum


def _inputs(seed, batch=2, length=37, d_model=16, vocab=53):
  k = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(k[0], (batch, length, d_model), jnp.float32)
  embedding = 0.5 * jax.random.normal(k[1], (vocab, d_model), jnp.float32)
  targets = jax.random.randint(k[2], (batch, length), 0, vocab)
  mask = (jax.random.uniform(k[3], (batch, length)) > 0.3).astype(jnp.float32)
  return hidden, embedding, targets, mask


def _reference(hidden, embedding, targets, mask):
  """float64 numpy: (summed loss, d loss / d hidden, d loss / d embedding)."""
  h, e = np.asarray(hidden, np.float64), np.asarray(embedding, np.float64)
  t, m = np.asarray(targets), np.asarray(mask, np.float64)
  logits = h @ e.T
  top = logits.max(-1, keepdims=True)
  lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
  target = np.take_along_axis(logits, t[..., None], -1)[..., 0]
  d_logits = np.exp(logits - lse[..., None]) - np.eye(e.shape[0])[t]
  d_logits *= m[..., None]
  return ((lse - target) * m).sum(), d_logits @ e, np.einsum("blv,bld->vd", d_logits, h)


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# block 16 splits the 37 positions into 3 blocks with 11 padded positions; 4096 takes them in one.
@pytest.mark.parametrize("block", [16, 4096])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_loss_and_gradients_match_dense_float64(block, dtype, tol):
  hidden, embedding, targets, mask = _inputs(block)
  loss = lambda h, e: cross_entropy_sum(h, e, targets, mask, dtype=dtype, block=block)[0]
  value, (d_hidden, d_embedding) = jax.value_and_grad(loss, argnums=(0, 1))(hidden, embedding)
  ref_value, ref_hidden, ref_embedding = _reference(hidden, embedding, targets, mask)
  assert d_hidden.dtype == hidden.dtype and d_embedding.dtype == embedding.dtype
  assert abs(float(value) - float(ref_value)) <= tol * abs(float(ref_value))
  assert _rel(d_hidden, ref_hidden) < tol
  assert _rel(d_embedding, ref_embedding) < tol
  # Unscored rows get no gradient.
  assert float(jnp.max(jnp.abs(d_hidden * (1 - mask)[..., None]))) == 0.0


def test_count_is_the_number_of_scored_tokens():
  hidden, embedding, targets, mask = _inputs(3)
  _, count = cross_entropy_sum(hidden, embedding, targets, mask, dtype=jnp.float32, block=16)
  assert float(count) == float(jnp.sum(mask))
