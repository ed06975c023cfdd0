"""The DRT forward pass against the reference semantics (docs/specification.md §1-§2)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax.model import lm
from drt_jax.model import retrieval as retrieval_ops
from tests.helpers import model_config, random_tokens, small_config


def _build(config):
  mc = model_config(config)
  model = lm.make_model(mc)
  params = nn.meta.unbox(lm.init_params(model, jax.random.key(0), 1, config.data.seq_len))
  return model, params


def _retrievals(model, params, tokens, *, train, rng):
  _, state = model.apply({"params": params}, tokens, train=train, rngs={"gumbel": rng},
                         mutable=["intermediates"])
  inter = state["intermediates"]
  return [inter[f"retrieval_{g}"][0] for g in range(model.config.num_groups)]


@pytest.mark.parametrize("train", [False, True])
def test_no_chunk_retrieves_itself_or_a_later_chunk(train):
  config = small_config(topk=2)
  config.data.seq_len = 7 * 10
  model, params = _build(config)
  tokens = random_tokens(2, 3, config.data.seq_len)
  for g, sel in enumerate(_retrievals(model, params, tokens, train=train, rng=jax.random.key(3))):
    chunk = np.arange(10)[None, :, None]
    valid = np.asarray(sel.valid)
    assert np.all(np.asarray(sel.indices)[valid] < np.broadcast_to(chunk, valid.shape)[valid])
    # chunk j has min(j, k) earlier chunks: exactly that many valid slots, weights summing to 1
    np.testing.assert_array_equal(valid.sum(-1), np.minimum(np.arange(10), 2)[None, :].repeat(3, 0))
    weights = np.asarray(sel.weights)
    assert np.all(weights[~valid] == 0)
    np.testing.assert_allclose(weights.sum(-1)[:, 1:], 1.0, rtol=1e-6)
    served = retrieval_ops.shift_to_next_chunk(sel)
    assert not np.any(np.asarray(served.valid)[:, :2]), "chunks 0 and 1 have nothing to retrieve"
    served_chunk = np.broadcast_to(np.arange(10)[None, :, None], valid.shape)
    sv = np.asarray(served.valid)
    assert np.all(np.asarray(served.indices)[sv] < served_chunk[sv] - 1)


def test_gumbel_noise_only_in_training_and_reproducible():
  config = small_config(topk=2)
  config.data.seq_len = 7 * 16
  model, params = _build(config)
  tokens = random_tokens(3, 2, config.data.seq_len)
  indices = lambda train, seed: np.asarray(  # noqa: E731
      _retrievals(model, params, tokens, train=train, rng=jax.random.key(seed))[0].indices)
  np.testing.assert_array_equal(indices(False, 1), indices(False, 2))
  np.testing.assert_array_equal(indices(True, 5), indices(True, 5))
  assert not np.array_equal(indices(True, 5), indices(True, 6))
  assert not np.array_equal(indices(True, 5), indices(False, 5))
  # eval picks the noise-free top-k of the scores
  no_gumbel = small_config(topk=2, gumbel=False)
  no_gumbel.data.seq_len = config.data.seq_len
  model_ng = lm.make_model(model_config(no_gumbel))
  sel = _retrievals(model_ng, params, tokens, train=True, rng=jax.random.key(5))[0]
  np.testing.assert_array_equal(np.asarray(sel.indices), indices(False, 0))


def test_select_chunks_matches_a_sorted_reference():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(2, 9, 9)).astype(np.float32)
  mask = np.asarray(retrieval_ops.causal_chunk_mask(np.arange(9), np.arange(9)))
  sel = retrieval_ops.select_chunks(jnp.asarray(scores), mask, 4)
  for b in range(2):
    assert np.all(np.asarray(sel.weights)[b, 0] == 0) and not np.any(np.asarray(sel.valid)[b, 0])
    for j in range(1, 9):
      order = np.argsort(-scores[b, j, :j])[:4]
      n = len(order)
      np.testing.assert_array_equal(np.asarray(sel.indices)[b, j, :n], order)
      expected = np.exp(scores[b, j, order] - scores[b, j, order].max())
      np.testing.assert_allclose(np.asarray(sel.weights)[b, j, :n], expected / expected.sum(),
                                 rtol=1e-6)
      assert np.all(np.asarray(sel.weights)[b, j, n:] == 0)


def test_retrieval_scores_receive_gradient():
  config = small_config()
  model, params = _build(config)
  tokens = random_tokens(4, 2, config.data.seq_len)

  def loss(p):
    total, count = lm.loss_terms(model, p, tokens, train=True, rng=jax.random.key(1))
    return total / count

  grads = jax.grad(loss)(params)
  # lmk_norm scales reach the loss only through the retrieval weights' softmax of scores.
  for g in range(2):
    assert float(jnp.abs(grads[f"lmk_norm_{g}"]["scale"]).max()) > 0


def test_ablation_switches_change_the_function():
  base = small_config()
  tokens = random_tokens(5, 2, base.data.seq_len)
  model, params = _build(base)
  reference = lm.logits(model, params, tokens)
  for field, value in [("residual", "standard"), ("softmax_off_by_one", False),
                       ("use_alibi", False), ("window", 3)]:
    variant, _ = _build(small_config(**{field: value}))
    out = lm.logits(variant, params, tokens)
    assert not np.allclose(out, reference, atol=1e-4), field


def test_random_retrieval_ignores_scores_and_is_fixed_outside_training():
  """Random retrieval ranks by noise alone: fresh noise per training step (the rng), outside
  training one fixed draw per (group, chunk, candidate), the same for other params (scores)."""
  config = small_config(retrieval="random", topk=2)
  config.data.seq_len = 7 * 12
  model, params = _build(config)
  other = nn.meta.unbox(lm.init_params(model, jax.random.key(9), 1, config.data.seq_len))
  tokens = random_tokens(6, 2, config.data.seq_len)
  indices = lambda p, train, seed: np.asarray(  # noqa: E731
      _retrievals(model, p, tokens, train=train, rng=jax.random.key(seed))[0].indices)
  assert not np.array_equal(indices(params, True, 1), indices(params, True, 2))
  np.testing.assert_array_equal(indices(params, True, 1), indices(other, True, 1))
  np.testing.assert_array_equal(indices(params, False, 1), indices(params, False, 2))
  np.testing.assert_array_equal(indices(params, False, 1), indices(other, False, 1))
  assert not np.array_equal(indices(params, False, 1), indices(params, True, 1))
  a = _retrievals(model, params, tokens, train=False, rng=jax.random.key(1))[0]
  assert np.all(np.asarray(a.indices)[np.asarray(a.valid)]
                < np.broadcast_to(np.arange(12)[None, :, None], a.valid.shape)[np.asarray(a.valid)])
  groups = _retrievals(model, params, tokens, train=False, rng=jax.random.key(1))
  assert not np.array_equal(np.asarray(groups[0].indices), np.asarray(groups[1].indices))


def test_loss_skips_the_last_token_and_respects_the_target_weights():
  config = small_config()
  model, params = _build(config)
  tokens = random_tokens(8, 2, config.data.seq_len)
  total, count = lm.loss_terms(model, params, tokens, train=False, rng=jax.random.key(0))
  assert int(count) == 2 * (config.data.seq_len - 1)
  logits = lm.logits(model, params, tokens)
  nll = -jax.nn.log_softmax(logits[:, :-1])
  expected = jnp.take_along_axis(nll, tokens[:, 1:, None], -1).sum()
  np.testing.assert_allclose(float(total), float(expected), rtol=1e-5)
  mask = jnp.zeros_like(tokens).at[:, 10].set(1)
  total, count = lm.loss_terms(model, params, tokens, train=False, rng=jax.random.key(0),
                               target_weights=mask)
  assert int(count) == 2
  np.testing.assert_allclose(float(total), float(nll[:, 9][jnp.arange(2), tokens[:, 10]].sum()),
                             rtol=1e-5)


def test_answer_hits_score_the_teacher_forced_argmax():
  config = small_config()
  model, params = _build(config)
  tokens = np.array(random_tokens(9, 4, config.data.seq_len))
  predicted = np.argmax(np.asarray(lm.logits(model, params, jnp.asarray(tokens))), axis=-1)
  starts = np.array([8, 15, 22, 36])
  answer = np.array(random_tokens(10, 4, 3))
  answer[0] = predicted[0, 7:10]  # row 0 all right, row 1 right at its second token only
  answer[1, 1] = predicted[1, 15]
  answer[1, [0, 2]] = (predicted[1, [14, 16]] + 1) % 257
  hits = lm.answer_hits(model, params, jnp.asarray(tokens), jnp.asarray(starts),
                        jnp.asarray(answer), rng=jax.random.key(0))
  rows = starts[:, None] - 1 + np.arange(3)
  expected = np.take_along_axis(predicted, rows, axis=1) == answer
  np.testing.assert_array_equal(np.asarray(hits), expected.astype(np.float32))
  assert expected[0].all() and expected[1].tolist() == [False, True, False]
