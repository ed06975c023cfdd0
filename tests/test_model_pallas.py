"""The model's impl="pallas" path (kernels in interpret mode on CPU) against impl="xla"."""

import flax.linen as nn
import jax
import numpy as np

from drt_jax.model import lm
from tests.helpers import model_config, random_tokens, small_config


def test_pallas_path_matches_xla_path_forward_and_gradients():
  config = small_config(chunk_len=31, window=40, topk=2)  # S = 32: a kernel tile size
  config.data.seq_len = 31 * 4
  xla = lm.make_model(model_config(config))
  config.model.impl = "pallas"
  pallas = lm.make_model(model_config(config))
  params = nn.meta.unbox(lm.init_params(xla, jax.random.key(0), 1, config.data.seq_len))
  tokens = random_tokens(3, 2, config.data.seq_len)

  def loss(model, p):
    total, count = lm.loss_terms(model, p, tokens, train=True, rng=jax.random.key(1))
    return total / count

  (loss_xla, grads_xla) = jax.value_and_grad(lambda p: loss(xla, p))(params)
  (loss_pallas, grads_pallas) = jax.value_and_grad(lambda p: loss(pallas, p))(params)
  np.testing.assert_allclose(float(loss_pallas), float(loss_xla), rtol=1e-5)
  for path, g_xla in jax.tree_util.tree_leaves_with_path(grads_xla):
    g_pallas = dict(jax.tree_util.tree_leaves_with_path(grads_pallas))[path]
    error = np.linalg.norm(g_pallas - g_xla) / max(np.linalg.norm(g_xla), 1e-12)
    assert error < 1e-4, (jax.tree_util.keystr(path), error)
