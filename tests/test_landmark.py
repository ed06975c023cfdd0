"""Landmark Attention: the blockwise op against a dense reference, and the whole model."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax import eval as eval_lib
from drt_jax.config import ConfigError
from drt_jax.data import sources
from drt_jax.data import tokenizer as tokenizer_lib
from drt_jax.model import architectures, lm
from drt_jax.model.landmark_attention import landmark_attention
from tests.helpers import model_config, random_tokens, small_config
from tests.test_generate import save_initial_checkpoint
from tests.landmark_reference import landmark_attention_dense

SIZE, THETA = 5, 10000.0  # S = chunk_len + 1 rows per block


def _qkv(seed, *, batch=2, blocks=4, heads=4, kv_heads=2, head_dim=8):
  keys = jax.random.split(jax.random.key(seed), 3)
  rows = blocks * SIZE
  q = jax.random.normal(keys[0], (batch, rows, heads, head_dim))
  k = jax.random.normal(keys[1], (batch, rows, kv_heads, head_dim))
  v = jax.random.normal(keys[2], (batch, rows, kv_heads, head_dim))
  return q, k, v


# tile_blocks: None = one tile here (4 blocks); 1: every tile pair off the diagonal is a single
# block pair; 3: two tiles, the last padded with two empty blocks.
@pytest.mark.parametrize("tile_blocks", [None, 1, 3])
@pytest.mark.parametrize("topk,selection", [(None, "per_head"), (2, "per_head"), (2, "shared"),
                                            (1, "shared")])
def test_blockwise_matches_dense_reference(topk, selection, tile_blocks):
  q, k, v = _qkv(0)
  settings = dict(theta=THETA, scale=8 ** -0.5, topk=topk, selection=selection)
  got = landmark_attention(q, k, v, chunk_size=SIZE, tile_blocks=tile_blocks, **settings)
  want = landmark_attention_dense(q, k, v, size=SIZE, **settings)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tile_blocks,topk", [(None, None), (2, None), (2, 1)])
def test_gradients_match_dense_reference(tile_blocks, topk):
  """The hand-written backward (grouped_softmax's custom VJP) against autodiff of the dense
  reference; tile_blocks=2 over 3 blocks: two tiles, one padded."""
  q, k, v = _qkv(1, blocks=3)
  weights = jax.random.normal(jax.random.key(2), q.shape)
  settings = dict(theta=THETA, scale=8 ** -0.5, topk=topk)

  def loss(fn, **extra):
    return lambda q, k, v: jnp.sum(fn(q, k, v, **settings, **extra) * weights)

  got = jax.grad(loss(landmark_attention, chunk_size=SIZE, tile_blocks=tile_blocks),
                 argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(landmark_attention_dense, size=SIZE), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_topk_of_every_block_is_the_training_softmax():
  q, k, v = _qkv(3)
  settings = dict(chunk_size=SIZE, theta=THETA, scale=8 ** -0.5)
  np.testing.assert_allclose(landmark_attention(q, k, v, topk=4, **settings),
                             landmark_attention(q, k, v, **settings), atol=1e-6, rtol=1e-6)


def _model(**overrides):
  config = model_config(small_config(arch="landmark", **overrides))
  model = lm.make_model(config)
  params = nn.unbox(lm.init_params(model, jax.random.key(0), 1, 42))
  return config, model, params


def test_model_trains_every_parameter():
  _, model, params = _model()
  tokens = random_tokens(5, 2, 42)
  grads = jax.grad(lambda p: lm.loss_terms(model, p, tokens, train=True,
                                           rng=jax.random.key(0))[0])(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.abs(g).max() > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("field,value,message", [
    ("landmark_selection", "max", "model.landmark_selection='max': must be one of"),
    ("impl", "triton", "model.impl='triton': model.arch='landmark' has no Pallas kernel"),
])
def test_bad_landmark_config_is_one_line_error(field, value, message):
  with pytest.raises(ConfigError, match=message):
    model_config(small_config(arch="landmark", **{field: value}))


def _decoded(config, params, tokens, prompt_len, *, segment_len):
  """Hidden states of tokens [b, T] fed as a prompt of prompt_len, then one step at a time."""
  session = architectures.make_decoder(config, params, max_len=tokens.shape[1],
                                       segment_len=segment_len).start(tokens.shape[0])
  pieces = [hidden for _, hidden in session.feed(tokens[:, :prompt_len])]
  pieces += [session.step(tokens[:, t])[:, None] for t in range(prompt_len, tokens.shape[1])]
  return jnp.concatenate(pieces, axis=1)


def test_decoding_equals_one_shot_forward_with_heads_sharing_their_blocks():
  # Per-head selection, causality and every prompt length: tests/test_architectures.py.
  config, model, params = _model(topk=2, landmark_selection="shared")
  tokens = random_tokens(6, 2, 42)
  want = model.apply({"params": params}, tokens, train=False)
  got = _decoded(config, params, tokens, 26, segment_len=14)  # segments of 2 blocks
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_decoding_with_topk_of_every_block_equals_training_forward():
  config, model, params = _model(topk=6, landmark_selection="shared")
  tokens = random_tokens(7, 1, 42)
  want = model.apply({"params": params}, tokens, train=True)
  np.testing.assert_allclose(_decoded(config, params, tokens, 10, segment_len=7), want,
                             atol=2e-5, rtol=2e-5)


def test_host_chunk_memory_is_one_line_error():
  config, _, params = _model()
  decoder = architectures.make_decoder(config, params, max_len=42, segment_len=7)
  with pytest.raises(ConfigError, match="model.arch='landmark' with chunk_memory='host'"):
    decoder.start(1, chunk_memory="host")


def test_training_never_holds_logits_of_the_whole_sequence():
  """Forward and backward hold one tile's logits [b, h, tile rows, tile rows] and per-row
  vectors, never [b, h, T, T] (here 4 tiles of 2 blocks)."""
  q, k, v = _qkv(9, batch=1, blocks=8)
  rows = q.shape[1]

  def loss(q, k, v):
    return jnp.sum(landmark_attention(q, k, v, chunk_size=SIZE, theta=THETA, scale=0.3,
                                      tile_blocks=2))

  text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
  sizes = [int(np.prod([int(n) for n in dims.split(",")]))
           for dims in re.findall(r"\[(\d+(?:,\d+)*)\]", text)]
  assert max(sizes) < q.shape[2] * rows * rows / 2


def test_eval_perplexity_and_passkey_run_end_to_end(tmp_path):
  """drt_jax.eval on a landmark checkpoint: ppl equals the one-shot loss of the inference rule;
  passkey decodes answers (an untrained model: any accuracy, no retrieval statistics)."""
  config = small_config(arch="landmark", topk=2)
  params = save_initial_checkpoint(config, str(tmp_path))
  ppl = eval_lib.run(config, str(tmp_path), eval_lib.Settings(
      task="ppl", lengths=(42,), out=str(tmp_path / "ppl.json"), windows=2, batch=2),
      progress=False)["results"][0]
  stream = sources.load_corpus(config.data, tokenizer_lib.make_tokenizer("byte")).eval.array()
  tokens = jnp.asarray(np.stack([stream[:42], stream[42:84]]), jnp.int32)
  model = lm.make_model(model_config(config))
  total, count = lm.loss_terms(model, jax.device_get(params), tokens, train=False,
                               rng=jax.random.key(0))
  np.testing.assert_allclose(ppl["nll"], float(total / count), rtol=1e-5)
  passkey = eval_lib.run(config, str(tmp_path), eval_lib.Settings(
      task="passkey", lengths=(78,), out=str(tmp_path / "passkey.json"), samples=(2,), depths=2,
      batch=2), progress=False)["results"][0]
  assert passkey["samples"] == 2 and 0 <= passkey["accuracy"] <= 1
  assert passkey["needle_retrieved"] is None
